"""Heads: the batched MCA head equals a per-sample loop; mean pooling; multi-output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mofo.models.heads import MeanPoolHead, MotionCrossAttentionHead, masked_mean, mca_per_sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")


D, HEADS = 24, 3


def block_on_sets(block, queries, keys):
    """One pre-norm cross-attention block with separate query and key/value sets, by hand."""
    attn = block.attn
    qn, kn = block.norm1(queries), block.norm1(keys)
    w_q, w_k, w_v = attn.qkv.weight.chunk(3)
    q = F.linear(qn, w_q, attn.q_bias)
    k = F.linear(kn, w_k)  # no k bias
    v = F.linear(kn, w_v, attn.v_bias)
    hd = D // HEADS
    q, k, v = (z.reshape(z.shape[0], HEADS, hd).transpose(0, 1) for z in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, dim=-1)
    out = (weights @ v).transpose(0, 1).reshape(queries.shape[0], D)
    x = queries + attn.proj(out)
    return x + block.mlp(block.norm2(x))


def mca_reference_per_sample(head, tokens, inbox):
    """MOFO's MCA as the published code runs it: one clip at a time."""
    feats = []
    for toks, flags in zip(tokens, inbox, strict=True):
        inside, outside = toks[flags], toks[~flags]
        if inside.shape[0] == 0:
            feats.append(toks.mean(0))
            continue
        keys = outside if outside.shape[0] else inside
        feats.append(block_on_sets(head.cross_block, inside, keys).mean(0))
    pooled = head.fc_norm(torch.stack(feats))
    if isinstance(head.head, torch.nn.ModuleDict):
        return {name: layer(pooled) for name, layer in head.head.items()}
    return head.head(pooled)


def make_head(outputs=7):
    torch.manual_seed(0)
    head = MotionCrossAttentionHead(D, outputs, num_heads=HEADS, init_scale=1.0).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that every term is exercised
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return head


def test_mca_batched_equals_per_sample_loop():
    head = make_head()
    gen = torch.Generator().manual_seed(1)
    for n in (1, 2, 9, 40):
        tokens = torch.randn(6, n, D, generator=gen)
        inbox = torch.rand(6, n, generator=gen) < 0.4
        inbox[0] = True  # all in the box: attend among in-box tokens
        inbox[1] = False  # none in the box: mean of all tokens
        inbox[2] = False
        inbox[2, 0] = True  # a single in-box token
        if n > 1:
            inbox[3] = False
            inbox[3, -1] = True
        got = head(tokens, inbox)
        want = mca_reference_per_sample(head, tokens, inbox)
        assert (got - want).abs().max().item() <= 1e-5



def mca_all_tokens(head, tokens, inbox):
    """The earlier batched head: every token a query, keys chosen by an attention mask."""
    keys = torch.where((~inbox).any(1, keepdim=True), ~inbox, inbox)
    attended = head.cross_block(tokens, attn_mask=keys[:, None, None, :])
    return torch.where(inbox.any(1)[:, None], masked_mean(attended, inbox), tokens.mean(1))


@pytest.mark.parametrize("case", ["none_in_box", "all_in_box", "one_token", "mixed"])
def test_mca_whole_batch_edge_cases(case):
    """Batches where no clip, or every clip, lacks one side of the box; N = 1."""
    head = make_head()
    gen = torch.Generator().manual_seed(2)
    n = 1 if case == "one_token" else 16
    tokens = torch.randn(4, n, D, generator=gen, requires_grad=True)
    if case == "none_in_box":
        inbox = torch.zeros(4, n, dtype=torch.bool)
    elif case in ("all_in_box", "one_token"):
        inbox = torch.ones(4, n, dtype=torch.bool)
    else:
        inbox = torch.rand(4, n, generator=gen) < 0.3
        inbox[0] = False
    got = head(tokens, inbox)
    want = mca_reference_per_sample(head, tokens, inbox)
    assert (got - want).abs().max().item() <= 1e-5
    if case == "none_in_box":
        assert torch.allclose(head.pooled_features(tokens, inbox), tokens.mean(1))
    got.sum().backward()
    # The block stays in the graph even when nothing is pooled from it (DDP needs a gradient
    # for every parameter on every step).
    assert all(p.grad is not None for p in head.parameters())
    if case == "none_in_box":
        assert all(float(p.grad.abs().max()) == 0 for p in head.cross_block.parameters())


def test_mca_gradients_equal_per_sample_loop():
    head = make_head()
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(5, 30, D, generator=gen)
    inbox = torch.rand(5, 30, generator=gen) < 0.25
    inbox[1], inbox[2] = False, True
    grads = []
    for fn in (head.pooled_features, lambda t, f: mca_per_sample(head, t, f)):
        t = tokens.clone().requires_grad_(True)
        head.zero_grad()
        fn(t, inbox).pow(2).sum().backward()
        grads.append([t.grad] + [p.grad.clone() for p in head.cross_block.parameters()])
    for got, want in zip(*grads, strict=True):
        assert (got - want).abs().max().item() <= 1e-5
    want = mca_reference_per_sample(head, tokens, inbox)  # the by-hand loop agrees too
    pooled = head.fc_norm(mca_per_sample(head, tokens, inbox))
    assert (head.head(pooled) - want).abs().max().item() <= 1e-5


def test_mca_drop_path_draws_as_the_all_token_head():
    """Training with drop path: one draw per clip, the same draws as the earlier all-token
    head made, so a seeded fine-tuning run changes only by float rounding."""
    torch.manual_seed(0)
    head = MotionCrossAttentionHead(D, 7, num_heads=HEADS, drop_path=0.5, init_scale=1.0).train()
    tokens = torch.randn(8, 20, D)
    inbox = torch.rand(8, 20) < 0.3
    inbox[0] = False
    torch.manual_seed(5)
    got = head.pooled_features(tokens, inbox)
    after_new = torch.rand(1)
    torch.manual_seed(5)
    want = mca_all_tokens(head, tokens, inbox)
    after_old = torch.rand(1)
    assert (got - want).abs().max().item() <= 1e-5
    assert torch.equal(after_new, after_old)  # the same number of random draws

def test_mca_multi_output_and_gradients():
    head = make_head({"verb": 5, "noun": 11})
    tokens = torch.randn(3, 12, D, requires_grad=True)
    inbox = torch.rand(3, 12) < 0.5
    inbox[0], inbox[1] = True, False
    out = head(tokens, inbox)
    want = mca_reference_per_sample(head, tokens, inbox)
    assert set(out) == {"verb", "noun"} and out["noun"].shape == (3, 11)
    for name in out:
        assert (out[name] - want[name]).abs().max().item() <= 1e-5
    (out["verb"].sum() + out["noun"].sum()).backward()
    assert torch.isfinite(tokens.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


def test_mca_out_of_box_tokens_matter_only_as_keys():
    head = make_head()
    tokens = torch.randn(1, 10, D)
    inbox = torch.zeros(1, 10, dtype=torch.bool)
    inbox[0, :4] = True
    changed = tokens.clone()
    changed[0, 6] += torch.randn(D)  # an out-of-box token: changes the keys, so the output
    assert not torch.allclose(head(tokens, inbox), head(changed, inbox))
    with torch.no_grad():
        head.cross_block.attn.qkv.weight[D : 2 * D] = 0  # keys carry nothing: uniform attention
    # ... so an in-box token's output is the same wherever the out-of-box tokens sit.
    permuted = tokens.clone()
    permuted[0, 4:] = tokens[0, 4:].flip(0)
    assert torch.allclose(head(tokens, inbox), head(permuted, inbox), atol=1e-6)
    with pytest.raises(ValueError, match="in-box"):
        head(tokens, None)


@pytest.mark.parametrize("groups", [1, 3, 4, 20])
def test_mca_attention_groups_equal_per_sample_loop(monkeypatch, groups):
    """Clips sorted by in-box count and padded per group: any number of groups (one, fewer
    than the clips, a group whose clips have no box at all, more groups than clips) gives
    the per-clip result, and gradients."""
    monkeypatch.setattr("mofo.models.heads.ATTENTION_GROUPS", groups)
    head = make_head()
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randn(11, 24, D, generator=gen)
    inbox = torch.rand(11, 24, generator=gen) < torch.linspace(0.05, 0.9, 11)[:, None]
    inbox[[2, 5, 7, 9]] = False  # with 3 or 4 groups, the first group has no in-box token
    inbox[3] = True
    got = head(tokens, inbox)
    assert (got - mca_reference_per_sample(head, tokens, inbox)).abs().max().item() <= 1e-5
    grads = []
    for fn in (head.pooled_features, lambda t, f: mca_per_sample(head, t, f)):
        t = tokens.clone().requires_grad_(True)
        fn(t, inbox).pow(2).sum().backward()
        grads.append(t.grad)
    assert (grads[0] - grads[1]).abs().max().item() <= 1e-5


def test_mca_runs_fc2_once_per_clip_and_needs_its_dropout_off():
    """The batched head applies the MLP's last layer to each clip's mean hidden row (a
    linear layer commutes with the mean), not to every in-box token as the loop does."""
    head = make_head()
    rows = []
    hook = head.cross_block.mlp.fc2.register_forward_hook(lambda m, a, out: rows.append(a[0].shape[0]))
    tokens = torch.randn(5, 30, D)
    inbox = torch.rand(5, 30) < 0.4
    inbox[1] = False
    head(tokens, inbox)
    hook.remove()
    assert rows == [5]
    head.cross_block.mlp.drop2.p = 0.1
    head.train()
    with pytest.raises(ValueError, match="dropout"):
        head(tokens, inbox)


def test_mca_head_flops_by_hand():
    from mofo.bench.train import mca_head_flops

    # D = 2, MLP width 8. Clip 0: 2 queries, 2 keys; clip 1: no box (the loop skips it, the
    # batched head gives it one key); clip 2: all in the box, 4 queries attending to themselves.
    inbox = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    got = mca_head_flops(inbox, 2, groups=1)
    # Forward per clip: q 2qD^2 + kv 4kD^2 + proj 2qD^2 + fc1 2qD*8; attention 4qkD; fc2 2qD*8.
    linear = (16 + 32 + 16 + 64, 4 * 1 * 4, 32 + 64 + 32 + 128)
    attention, fc2 = (32, 0, 128), (64, 0, 128)
    irreducible = sum(linear) - linear[1] + sum(attention)
    assert got["loop_gflop"] == pytest.approx(3 * (irreducible + sum(fc2)) / 1e9)
    assert got["irreducible_gflop"] == pytest.approx(3 * irreducible / 1e9)
    # Batched, one group: attention padded to 3 clips x 4 queries x 4 keys; fc2 on one row per
    # clip (2 * 2 * 8 each).
    assert got["batched_gflop"] == pytest.approx(3 * (sum(linear) + 3 * 4 * 4 * 4 * 2 + 3 * 32) / 1e9)
    # One group per clip: no padding.
    grouped = mca_head_flops(inbox, 2, groups=3)
    assert grouped["batched_gflop"] == pytest.approx(3 * (sum(linear) + sum(attention) + 3 * 32) / 1e9)


def test_mean_pool_head():
    torch.manual_seed(0)
    head = MeanPoolHead(D, 4, init_scale=1.0).eval()
    tokens = torch.randn(2, 5, D)
    want = head.head(head.fc_norm(tokens.mean(1)))
    assert torch.allclose(head(tokens), want)
    small = MeanPoolHead(D, 4, init_scale=0.001)
    assert 0 < small.head.weight.abs().max() <= 0.001 * 6 * 0.02  # N(0, .02) scaled by .001
    multi = MeanPoolHead(D, {"verb": 3, "noun": 2})
    assert {k: v.shape for k, v in multi(tokens).items()} == {"verb": (2, 3), "noun": (2, 2)}


def test_bench_times_the_head_beside_a_per_clip_loop():
    from mofo.bench.train import box_flags, mca_head_summary, time_mca_head

    flags = box_flags(4, (2, 8, 8), 0.25)
    assert flags.shape == (4, 128) and 0 < flags.sum(1).min() and flags.sum(1).max() < 128
    result = time_mca_head(3, (2, 4, 4), D, HEADS, repeats=2)
    assert result["max_abs_diff"] <= 1e-5 and len(result["all_s"]["batched"]) == 2
    assert result["batched_s"] > 0 and result["per_clip_loop_s"] > 0
    assert 0 < result["irreducible_gflop"] < result["loop_gflop"]
    assert result["batched_cpu_s"] > 0 and "loop / batched" in mca_head_summary(result)
