"""SASRec network and training: causality, padding, masking, windows, and that training learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compile.sasrec import training_windows, train_epoch
from palr.sasrec import SASRec, SASRecArch, SASRecTopK, attention_mask


def small_model(norm: str = "pre", seed: int = 0) -> SASRec:
    torch.manual_seed(seed)
    return SASRec(SASRecArch(num_indices=40, max_len=12, hidden=16, blocks=2, heads=2, ffn_hidden=32,
                             norm=norm)).eval()


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_attention_is_causal(norm):
    model = small_model(norm)
    history = torch.tensor([[0, 0, 3, 7, 9, 11, 2, 5, 8, 13, 21, 4]])  # [1, 12]
    changed = history.clone()
    changed[0, 8:] = torch.tensor([30, 31, 32, 33])  # rewrite the 4 most recent items
    with torch.no_grad():
        before, after = model(history), model(changed)  # [1, 12, H]
    torch.testing.assert_close(after[:, :8], before[:, :8], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 8:], before[:, 8:])


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_left_padding_does_not_change_scores(norm):
    model = small_model(norm)
    items = torch.tensor([5, 9, 2, 17, 33])
    padded_short = torch.cat([torch.zeros(2, dtype=torch.long), items])[None]  # [1, 7]
    padded_full = torch.cat([torch.zeros(7, dtype=torch.long), items])[None]  # [1, 12]
    with torch.no_grad():
        short, full = model.next_item_scores(padded_short), model.next_item_scores(padded_full)
    torch.testing.assert_close(short, full, rtol=0, atol=1e-5)


def test_empty_history_gives_finite_scores():
    model = small_model()
    with torch.no_grad():
        scores = model.next_item_scores(torch.zeros(3, 12, dtype=torch.long))  # [3, N]
    assert torch.isfinite(scores).all()


def test_mask_has_no_future_and_no_padding_keys():
    history = torch.tensor([[0, 0, 4, 5], [1, 2, 3, 4]])
    allowed = attention_mask(history)[:, 0]  # [B, T, T]
    assert not (allowed & ~torch.ones(4, 4, dtype=torch.bool).tril()).any()  # nothing above the diagonal
    assert allowed[0, 3].tolist() == [False, False, True, True]  # padding keys hidden from real queries
    assert allowed[0, 0].tolist() == [True, False, False, False]  # a padding query sees only itself
    assert allowed[1].equal(torch.ones(4, 4, dtype=torch.bool).tril())


def test_topk_wrapper_masks_excluded_items_and_padding():
    model = small_model()
    wrapper = SASRecTopK(model, top_k=39)  # 40 indices: all but one, so masked ones show up as -inf
    history = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 3, 4, 5, 6, 7]])
    exclude = torch.tensor([[3, 4, 5, 6, 7, 0, 0]])
    with torch.no_grad():
        scores, indices = wrapper(history, exclude)  # [1, 39] each
    finite = torch.isfinite(scores[0])
    assert int(finite.sum()) == 39 - 5  # items 1..39 minus the 5 excluded
    assert not set(indices[0][finite].tolist()) & {0, 3, 4, 5, 6, 7}
    assert (scores[0][finite][:-1] >= scores[0][finite][1:]).all()


def test_training_windows_cover_every_target_once():
    sequences = [list(range(1, 24)), [5, 6], [7]]  # 23 items, 2 items, 1 item
    inputs, targets = training_windows(sequences, max_len=10, stride=10)
    assert inputs.shape == targets.shape and inputs.shape[1] == 10
    # every next-item pair (prev → next) of every sequence appears exactly once
    pairs = sorted((int(i), int(t)) for x, y in zip(inputs, targets) for i, t in zip(x, y) if t)
    expected = sorted((a, b) for seq in sequences for a, b in zip(seq, seq[1:]))
    assert pairs == expected
    # inputs are left-padded and each target is the input shifted by one
    for x, y in zip(inputs, targets):
        real = x != 0
        assert (y[real] != 0).all() and (np.diff(np.flatnonzero(real)) == 1).all()
        assert real[-1]


def test_training_windows_with_overlap_give_later_targets_longer_context():
    inputs, targets = training_windows([list(range(1, 31))], max_len=10, stride=5)
    assert len(inputs) == 5  # windows end at items 30, 25, 20, 15 and 10 (the oldest starts at the first item)
    assert targets[-1][targets[-1] != 0][0] == 2  # the first target is the second item


def test_a_few_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    # a learnable pattern: each sequence walks through items in steps of 1 from a random start
    starts = rng.integers(1, 20, size=64)
    sequences = [[int(s + i) for i in range(12)] for s in starts]
    inputs, targets = training_windows(sequences, max_len=10, stride=10)
    model = SASRec(SASRecArch(num_indices=40, max_len=10, hidden=16, blocks=1, heads=2, ffn_hidden=32, dropout=0.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first, _ = train_epoch(model, optimizer, inputs, targets, batch_size=16, rng=rng)
    for _ in range(6):
        last, steps = train_epoch(model, optimizer, inputs, targets, batch_size=16, rng=rng)
    assert steps == len(inputs) // 16
    assert last < first * 0.5


def test_random_windows_cover_every_target_and_keep_the_latest_window():
    sequence = list(range(1, 48))
    rng = np.random.default_rng(0)
    shifts_seen = set()
    for _ in range(20):
        inputs, targets = training_windows([sequence], max_len=10, stride=10, rng=rng)
        pairs = {(int(i), int(t)) for x, y in zip(inputs, targets) for i, t in zip(x, y) if t}
        assert pairs == set(zip(sequence, sequence[1:]))
        assert targets[0][-1] == sequence[-1]  # the most recent window ends at the sequence end
        shifts_seen.add(int(targets[1][-1]))
    assert len(shifts_seen) > 3  # the earlier windows move from epoch to epoch
