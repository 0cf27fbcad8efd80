"""model.py: the Llama 2 function run.c computes, the KV cache, and the losses."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny
from engine import compiled_step, generate, new_cache, sample_next
from model import PRESETS, ModelArgs, Transformer, answer_logprobs, answer_loss, apply_rope, rope_tables


def test_shapes_with_and_without_targets():
    model = tiny()
    tokens = torch.randint(0, 97, (3, 20))
    logits, loss = model(tokens, tokens)
    assert logits.shape == (3, 20, 97) and loss.ndim == 0
    logits, loss = model(tokens)
    assert logits.shape == (3, 1, 97) and loss is None  # inference: the last position only


def test_gqa_shares_each_kv_head_between_query_heads():
    model = tiny(n_heads=8, n_kv_heads=2)
    attn = model.layers[0].attention
    assert attn.wq.weight.shape == (64, 64) and attn.wk.weight.shape == (16, 64) and attn.wv.weight.shape == (16, 64)
    # GQA equals full attention whose k/v weights repeat each kv head for its group of query heads
    full = tiny(n_heads=8, n_kv_heads=8)
    state = model.state_dict()
    for i in range(2):
        for w in ("wk", "wv"):
            key = f"layers.{i}.attention.{w}.weight"
            state[key] = state[key].view(2, 8, 64).repeat_interleave(4, dim=0).reshape(64, 64)
    full.load_state_dict(state)
    tokens = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(model(tokens, tokens)[0], full(tokens, tokens)[0], atol=1e-5, rtol=1e-5)


def test_rope_rotates_interleaved_pairs_as_run_c_does():
    head_dim, T = 16, 7
    cos, sin = rope_tables(head_dim, T)
    x = torch.randn(1, T, 2, head_dim)
    expected = x.clone()
    for pos in range(T):  # run.c's loop, transcribed
        for i in range(0, head_dim, 2):
            freq = 1.0 / 10000.0 ** (i / head_dim)
            c, s = math.cos(pos * freq), math.sin(pos * freq)
            v0, v1 = x[0, pos, :, i].clone(), x[0, pos, :, i + 1].clone()
            expected[0, pos, :, i], expected[0, pos, :, i + 1] = v0 * c - v1 * s, v0 * s + v1 * c
    torch.testing.assert_close(apply_rope(x, cos, sin), expected, atol=1e-5, rtol=1e-5)


def test_rope_makes_attention_scores_depend_on_relative_position_only():
    cos, sin = rope_tables(32, 64)
    q, k = torch.randn(32), torch.randn(32)

    def score(m, n):
        qm = apply_rope(q.view(1, 1, 1, 32).expand(1, 64, 1, 32), cos, sin)[0, m, 0]
        kn = apply_rope(k.view(1, 1, 1, 32).expand(1, 64, 1, 32), cos, sin)[0, n, 0]
        return (qm @ kn).item()

    assert score(10, 3) == pytest.approx(score(50, 43), abs=1e-4)
    assert score(5, 5) == pytest.approx(score(60, 60), abs=1e-4)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-3)


def test_attention_is_causal():
    model = tiny()
    a = torch.randint(0, 97, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % 97  # change only the future
    la, _ = model(a, a)
    lb, _ = model(b, b)
    torch.testing.assert_close(la[:, :8], lb[:, :8])


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_greedy_generation_with_the_kv_cache_equals_recomputing_everything(n_kv_heads):
    model = tiny(n_kv_heads=n_kv_heads)
    prompt = torch.randint(3, 97, (2, 9))
    cached = torch.stack(list(generate(model, prompt, 30, temperature=0)), dim=1)
    naive = torch.stack(list(generate(model, prompt, 30, temperature=0, use_cache=False)), dim=1)
    assert cached.shape == (2, 30) and torch.equal(cached, naive)


def test_a_chunk_after_a_cached_prefix_sees_the_prefix_and_itself_causally():
    model = tiny()
    tokens = torch.randint(0, 97, (1, 20))
    full, _ = model(tokens, tokens)
    cache = new_cache(model, 1, 20, "cpu", torch.float32)
    model(tokens[:, :12], cache=cache, start_pos=0)
    # logits of the last position of the chunk 12..19, computed with the first 12 in the cache
    chunk_last, _ = model(tokens[:, 12:], cache=cache, start_pos=12)
    torch.testing.assert_close(chunk_last[0, -1], full[0, -1], atol=1e-5, rtol=1e-5)


def test_generation_stops_at_a_stop_token_and_at_the_context_end():
    model = tiny()
    prompt = torch.randint(3, 97, (1, 5))
    first = next(generate(model, prompt, 10, temperature=0)).item()
    assert len(list(generate(model, prompt, 10, temperature=0, stop_tokens=[first]))) == 1
    assert len(list(generate(model, prompt, 1000, temperature=0))) == 48 - 5


def test_the_answer_loss_and_log_probs_count_only_the_answers_tokens():
    model = tiny()
    tokens = torch.randint(0, 97, (2, 10))
    targets = torch.randint(0, 97, (2, 10))
    mask = torch.zeros(2, 10)
    mask[0, 3:6] = 1
    mask[1, 8] = 1
    all_logits, _ = model(tokens, targets)
    logp = F.log_softmax(all_logits.float(), dim=-1)
    picked = [(0, 3), (0, 4), (0, 5), (1, 8)]
    expected = -sum(logp[b, t, targets[b, t]] for b, t in picked) / len(picked)
    batch = {"tokens": tokens, "targets": targets, "loss_mask": mask}
    assert answer_loss(model, batch).item() == pytest.approx(expected.item(), rel=1e-5)
    want = torch.zeros(2, 10)
    for b, t in picked:
        want[b, t] = logp[b, t, targets[b, t]]
    torch.testing.assert_close(answer_logprobs(model, batch), want, atol=1e-5, rtol=1e-5)
    # without a mask, a target of -1 is ignored
    targets[0, :5] = -1
    _, loss = model(tokens, targets)
    kept = [(b, t) for b in range(2) for t in range(10) if targets[b, t] >= 0]
    expected = -sum(logp[b, t, targets[b, t]] for b, t in kept) / len(kept)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_tied_embeddings_are_one_tensor_and_untied_are_two():
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.num_params() == tied.num_params() + 97 * 64


def test_preset_sizes_with_the_chatglm_vocabulary():
    counts = {name: Transformer(ModelArgs(**shape, vocab_size=64793)).num_params() / 1e6
              for name, shape in PRESETS.items() if name in ("24m", "58m")}
    assert counts["24m"] == pytest.approx(24.6, abs=0.1) and counts["58m"] == pytest.approx(58.5, abs=0.1)


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0, -2.0]])
    torch.manual_seed(0)
    assert {sample_next(logits, 1.0, top_k=2).item() for _ in range(200)} == {0, 1}
    # p(0) = 0.72, p(1) = 0.26: top_p=0.5 keeps only the first
    assert {sample_next(logits, 1.0, top_p=0.5).item() for _ in range(200)} == {0}
    assert sample_next(logits, 0).item() == 0


def test_the_fixed_shape_decode_step_generates_what_the_cached_step_does_in_one_graph():
    from torch._dynamo.utils import counters
    model = tiny(max_seq_len=48)
    prompt = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        cached = [t.tolist() for t in generate(model, prompt, 30, temperature=0)]
        torch._dynamo.reset()
        counters.clear()
        step = compiled_step(model, backend="eager")  # what dynamo traces; inductor would only be slower here
        stepped = [t.tolist() for t in generate(model, prompt, 30, temperature=0, step=step)]
    assert stepped == cached
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # one graph for every position


def test_zeroed_output_projections_make_every_block_the_identity():
    model = tiny()
    model.zero_output_projections()
    x = torch.randn(2, 7, 64)
    cos, sin = model.rope_cos[:7], model.rope_sin[:7]
    for layer in model.layers:
        assert torch.equal(layer(x, cos, sin), x)


@pytest.mark.parametrize("tied", [True, False])
def test_new_vocabulary_rows_are_as_likely_as_unk_and_leave_the_old_ids_as_they_were(tied):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=300, max_seq_len=32,
                                  tie_embeddings=tied)).eval()
    tokens = torch.randint(3, 300, (2, 16))
    with torch.no_grad():
        before = model(tokens, tokens)[0]
        assert model.resize_vocab(340, torch.Generator().manual_seed(0)) == 40
        after = model(tokens, tokens)[0]
    assert after.shape[-1] == 340
    torch.testing.assert_close(after[..., :300], before)  # the old ids' logits, exactly as they were
    # every new id exactly as likely as <unk> (id 0): their share is 40 x p(<unk>), small in a trained model
    torch.testing.assert_close(after[..., 300:], after[..., :1].expand(-1, -1, 40))
    if not tied:  # the input rows of the new tokens: an average token, each its own
        new = model.tok_embeddings.weight[300:]
        assert new.std(0).mean() > 0.5 * model.tok_embeddings.weight[:300].std(0).mean()
