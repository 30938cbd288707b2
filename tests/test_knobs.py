"""Every ablation knob of the paper changes exactly what it should (docs/reproduce.md): token order
(App. Tab. III), predictor keys (App. Tab. I), λ per task and the loss weights (Eq. 1, App. Tab. IV-V),
N_seek (Tab. 5), the task subset (App. Tab. II), the special tokens and embedding losses during IFT
(Tab. 6, Tab. 4), and train.py's flags for each of them."""

from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_ola, toy_batch

from ola import OLAConfig
from recipe import parse_args, set_trainable
from tasks import IMAGE, SYS, TASKS

N_IMG = 64  # the tiny CLIP's 8×8 tokens


def random_targets(model, n_images: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        task: torch.randn(n_images, N_IMG if TASKS[task].spatial else 1, dim, generator=g)
        for task, dim in model.target_dims.items()
    }


def spliced_segments(model) -> list[int]:
    """The segment ids of the first sample's spliced sequence, consecutive repeats collapsed."""
    ids, mask, labels, images, _ = toy_batch()
    segments = model.splice(ids, mask, labels, images)[3][0].tolist()
    return [s for i, s in enumerate(segments) if i == 0 or s != segments[i - 1]]


@pytest.mark.parametrize("order", [("gen", "depth", "seg"), ("seg", "gen", "depth"), ("depth", "seg", "gen")])
def test_token_order_is_the_order_of_the_special_token_blocks(order):
    model, _ = tiny_ola(OLAConfig(token_order=order))
    image_then_tokens = [SYS, IMAGE, *(TASKS[t].segment for t in order)]
    assert spliced_segments(model)[:5] == image_then_tokens


@pytest.mark.parametrize("key_input", ["img+t", "sys+img+t", "sys+img+t+txt"])
def test_key_input_is_what_the_predictor_reads(key_input):
    """Perturb the hidden states of one segment at a time: the prediction moves iff the segment is a key."""
    model, _ = tiny_ola(OLAConfig(key_input=key_input))
    ids, mask, labels, images, _ = toy_batch()
    embeds, _, _, segments = model.splice(ids, mask, labels, images)
    hidden = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model.predictors.predict("depth", 2, hidden, segments, model.tokens)
        for name, segment in {"sys": SYS, "img": IMAGE, "txt": 6}.items():
            moved = hidden + 3.0 * (segments == segment).unsqueeze(-1)
            pred = model.predictors.predict("depth", 2, moved, segments, model.tokens)
            changed = not torch.allclose(pred[0], base[0], atol=1e-6)
            assert changed == (name in key_input.split("+")), name


def test_task_and_loss_weights_give_eq_1():
    """L = L_NTP + Σ_task λ_task Σ_l (λ_sL1 smooth-L1 + λ_con InfoNCE), recomputed from the predictions."""
    cfg = OLAConfig(task_weights={"depth": 0.1, "seg": 1.0}, sl1_weight=0.7, contrastive_weight=0.2)
    model, _ = tiny_ola(cfg)
    ids, mask, labels, images, has_image = toy_batch()
    targets = random_targets(model, len(images))
    out = model(ids, mask, labels, images, has_image, targets)
    rows = has_image.nonzero().flatten()
    full = {t: torch.zeros(3, *x.shape[1:]).index_copy(0, rows, x) for t, x in targets.items()}
    expected = out.terms["ntp"]
    for (task, _layer), pred in out.predictions.items():
        p, t = pred[has_image], full[task][has_image]
        sl1 = F.smooth_l1_loss(p, t)
        scale = model.predictors.logit_scales[task].exp().clamp(max=100)
        logits = F.normalize(p.flatten(1), dim=-1) @ F.normalize(t.flatten(1), dim=-1).T * scale
        con = F.cross_entropy(logits, torch.arange(len(p)))
        weight = {"depth": 0.1, "seg": 1.0, "gen": 0.5}[task]
        expected = expected + weight * (0.7 * sl1 + 0.2 * con)
    assert abs(out.loss.item() - expected.item()) < 1e-5


def test_contrastive_weight_zero_has_no_infonce_and_no_logit_scales():
    model, _ = tiny_ola(OLAConfig(contrastive_weight=0.0))
    ids, mask, labels, images, has_image = toy_batch()
    out = model(ids, mask, labels, images, has_image, random_targets(model, len(images)))
    assert model.predictors.logit_scales is None and not any(k.endswith("/con") for k in out.terms)


def test_n_seek_zero_means_no_special_tokens():
    model, _ = tiny_ola(OLAConfig(num_seek_tokens=0))
    assert model.tokens is None and model.image_seq_len == N_IMG
    assert spliced_segments(model) == [SYS, IMAGE, 6]
    sixteen, _ = tiny_ola(OLAConfig(num_seek_tokens=16))
    assert sixteen.image_seq_len == N_IMG + 3 * 16


def test_n_seek_that_does_not_divide_the_grid_pools_adaptive_chunks():
    """Tab. 5's N_seek = 24 on the tiny 8×8 grid: token i is the mean of rows [⌊64i/24⌋, ⌈64(i+1)/24⌉)."""
    model, _ = tiny_ola(OLAConfig(num_seek_tokens=24))
    q = model.tokens.parameter("depth")  # (64, H)
    tokens = model.tokens("depth")
    for i in (0, 5, 23):
        lo, hi = (64 * i) // 24, -((-64 * (i + 1)) // 24)
        assert torch.allclose(tokens[i], q[lo:hi].mean(0), atol=1e-6)
    assert model.image_seq_len == N_IMG + 3 * 24


def test_a_task_subset_builds_only_its_parts():
    model, _ = tiny_ola(OLAConfig(tasks=("depth",)))
    assert set(model.predictors.heads) == {"depth"} and set(model.target_dims) == {"depth"}
    assert [n for n, _ in model.tokens.named_parameters()] == ["q_depth"]
    assert spliced_segments(model)[:3] == [SYS, IMAGE, TASKS["depth"].segment]


@pytest.mark.parametrize("mode", ["frozen", "learnable", "none"])
def test_ift_special_token_modes(mode):
    model, _ = tiny_ola()
    counts = set_trainable(model, "ift", verbose=False, tokens=mode)
    if mode == "none":
        assert model.tokens is None and model.image_seq_len == N_IMG and "tokens" not in counts
        assert spliced_segments(model) == [SYS, IMAGE, 6]
    else:
        trainable = all(p.requires_grad for p in model.tokens.parameters())
        assert trainable == (mode == "learnable") and model.image_seq_len == N_IMG + 24
    assert model.predictors is None


def test_embedding_losses_in_ift_keep_and_train_the_predictors():
    model, _ = tiny_ola()
    set_trainable(model, "ift", verbose=False, emb_losses=True)
    assert all(p.requires_grad for p in model.predictors.parameters())
    assert all(p.requires_grad for p in model.llm.parameters())
    pt_without, _ = tiny_ola()
    set_trainable(pt_without, "pt", verbose=False, emb_losses=False)
    assert pt_without.predictors is None and pt_without.projector[0].weight.requires_grad


def test_every_knob_is_a_train_flag_saved_in_the_model_config():
    args = parse_args(
        [
            "--layers",
            "depth=4,28",
            "--layers",
            "gen=16",
            "--task-weight",
            "seg=0.25",
            "--sl1-weight",
            "0",
            "--contrastive-weight",
            "0.5",
            "--num-seek-tokens",
            "4",
            "--token-order",
            "seg,depth,gen",
            "--key-input",
            "img+t",
            "--ift-tokens",
            "learnable",
            "--emb-losses",
            "pt+ift",
        ]
    )
    cfg = args.ola
    assert cfg.layer_sets == {"depth": (4, 28), "gen": (16,)} and cfg.task_weights == {"seg": 0.25}
    assert (cfg.sl1_weight, cfg.contrastive_weight, cfg.num_seek_tokens) == (0.0, 0.5, 4)
    assert cfg.token_order == ("seg", "depth", "gen") and cfg.key_input == "img+t"
    assert args.ift_tokens == "learnable" and args.emb_stages == ("pt", "ift")
    assert OLAConfig.from_dict(asdict(cfg)) == cfg  # survives the checkpoint JSON
    assert parse_args(["--mode", "llava"]).ola.tasks == ()
    assert parse_args([]).ola == OLAConfig()  # no flag: the paper's defaults


def test_bad_knob_values_are_named(capsys):
    for argv, message in [
        (["--layers", "depht=8"], "--layers 'depht=8'"),
        (["--token-order", "gen,depth"], "token_order"),
        (["--num-seek-tokens", "-1"], "num_seek_tokens"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err
