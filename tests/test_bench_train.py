"""The train-step benchmark compares like with like: on one batch, in fp32 on CPU, every provider of
`bench/bench_train.py` gives the same DPO loss and the same policy gradients as the naive padded
full-logits program."""

import pytest
import torch

from bench import bench_train

# the bundled demo model's sizes, with a vocabulary large enough for the head to be chunked
SHAPE = bench_train.TrainShape(hidden=64, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=1000, pairs=4,
                               prompt_len=24, response_len=12, max_tokens=128)


def _loss_and_grads(provider):
    policy, reference = bench_train.make_models(SHAPE)
    loss = bench_train.PROVIDERS[provider](policy, reference, SHAPE)(bench_train.make_examples(SHAPE))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in policy.named_parameters()}


@pytest.fixture(autouse=True)
def _cpu(monkeypatch):
    monkeypatch.setattr(bench_train, "DEVICE", "cpu")


@pytest.mark.parametrize("provider", ["fastpo", "fastpo-generic", "fastpo-unshared"])
def test_train_providers_match_naive(provider):
    naive_loss, naive_grads = _loss_and_grads("naive")
    loss, grads = _loss_and_grads(provider)
    assert abs(loss.item() - 0.6931) > 1e-3, "reference equals policy: the check would be vacuous"
    torch.testing.assert_close(loss, naive_loss, rtol=0, atol=1e-5)
    for name, g in naive_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_naive_batch_is_chosen_then_rejected():
    examples = bench_train.make_examples(SHAPE)
    batch = bench_train.padded_pairs(examples)
    B = len(examples)
    for i, ex in enumerate(examples):
        for k, row in ((0, i), (1, B + i)):
            n_p, n_y = len(ex.prompt_ids), len(ex.response_ids[k])
            assert batch["input_ids"][row, : n_p + n_y].tolist() == list(ex.prompt_ids) + list(ex.response_ids[k])
            assert batch["labels"][row, n_p : n_p + n_y].tolist() == list(ex.response_ids[k])
            assert (batch["labels"][row, :n_p] == -100).all() and (batch["attention_mask"][row, n_p + n_y :] == 0).all()
