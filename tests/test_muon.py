"""muon.py: the orthogonalized update, the AdamW half, and which weights configure_optimizers gives to which."""
import pytest
import torch

from model import ModelArgs, Transformer
from muon import MuonAdamW, orthogonalize


@pytest.mark.parametrize("shape", [(64, 64), (192, 64), (32, 96)])
def test_orthogonalize_keeps_the_directions_and_evens_out_the_singular_values(shape):
    torch.manual_seed(0)
    # a gradient-like matrix: a few directions much larger than the rest
    G = torch.randn(*shape) + 20 * torch.randn(shape[0], 2) @ torch.randn(2, shape[1])
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    O = orthogonalize(G)
    assert S.max() / S.min() > 50
    # the same singular directions: U^T O V is diagonal (Newton-Schulz is an odd polynomial in G)
    M = U.T @ O @ Vh.T
    assert (M - torch.diag(M.diagonal())).norm() < 1e-3 * M.norm()
    # and every direction that is not vanishingly small moves by about the same amount
    s = M.diagonal()
    assert s.max() < 1.3
    assert s[S > 0.01 * G.norm()].min() > 0.6


def test_non_muon_groups_step_exactly_like_torch_adamw():
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 7)), torch.nn.Parameter(torch.randn(7))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = MuonAdamW([{"params": ours[:1], "weight_decay": 0.1}, {"params": ours[1:]}], lr=1e-2, betas=(0.9, 0.95))
    opt_theirs = torch.optim.AdamW([{"params": theirs[:1], "weight_decay": 0.1}, {"params": theirs[1:], "weight_decay": 0.0}],
                                   lr=1e-2, betas=(0.9, 0.95))
    for _ in range(10):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt_ours.step()
        opt_theirs.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_muon_step_moves_a_matrix_by_its_orthogonalized_momentum():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(48, 16))
    w0 = w.detach().clone()
    opt = MuonAdamW([{"params": [w], "muon": True}], lr=1e-2)
    w.grad = torch.randn(48, 16)
    opt.step()
    # first step, Nesterov: the update direction is orthogonalize(g + 0.95 g), scaled by 0.2 * sqrt(48)
    expected = w0 - 1e-2 * 0.2 * 48 ** 0.5 * orthogonalize(1.95 * w.grad)
    torch.testing.assert_close(w.detach(), expected)


def test_configure_optimizers_gives_muon_the_block_matrices_only():
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, max_seq_len=16))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = [(g["muon"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in opt.param_groups]
    muon_names = by_group[0][2]
    assert by_group[0][:2] == (True, 0.1) and len(muon_names) == 2 * 7  # wq wk wv wo w1 w2 w3 per block
    assert all(n.startswith("layers.") and n.endswith(".weight") and "norm" not in n for n in muon_names)
    assert by_group[1] == (False, 0.1, ["tok_embeddings.weight"])  # tied: also the classifier
    assert by_group[2][:2] == (False, 0.0) and all("norm" in n for n in by_group[2][2])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert isinstance(model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", muon=False), torch.optim.AdamW)


def test_muon_groups_refuse_vectors():
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(4))], "muon": True}], lr=1e-3)


def test_batched_and_bf16_newton_schulz_agree_with_the_one_matrix_fp32_path():
    torch.manual_seed(0)
    stack = torch.randn(4, 48, 32)
    one_by_one = torch.stack([orthogonalize(g) for g in stack])
    torch.testing.assert_close(orthogonalize(stack), one_by_one, atol=1e-5, rtol=1e-4)  # the GPU's batched form
    bf16 = orthogonalize(stack, dtype=torch.bfloat16)  # the GPU's precision: the same directions, rougher
    assert bf16.dtype == torch.float32 and (bf16 - one_by_one).norm() < 0.05 * one_by_one.norm()
    params = [torch.nn.Parameter(g.clone()) for g in stack]
    copies = [torch.nn.Parameter(g.clone()) for g in stack]
    batched = MuonAdamW([dict(params=params, muon=True)], lr=0.01, batched=True)
    plain = MuonAdamW([dict(params=copies, muon=True)], lr=0.01)
    for p, q in zip(params, copies):
        p.grad = q.grad = torch.randn(48, 32)
    batched.step()
    plain.step()
    for p, q in zip(params, copies):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
