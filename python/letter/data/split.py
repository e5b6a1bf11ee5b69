"""Leave-one-out split exactly as the LETTER / LC-Rec code builds it."""
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from letter.data.dataset import Dataset
from letter.errors import LetterError, LetterWarning, SettingError

Sample = tuple[list[int], int]  # (history, target), history in time order

MIN_SEQUENCE_LENGTH = 3  # one training item, one validation target, one test target


def check_max_history(max_history: int) -> None:
    """SettingError unless max_history >= 1: 0 would keep whole histories (items[-0:]), -n all
    but their first n items."""
    if max_history < 1:
        raise SettingError("max_history", f"must be >= 1, got {max_history}")


def check_training_samples(dataset: Dataset, source: str) -> None:
    """A LetterError naming `source` unless leave_one_out(dataset) has a training sample, i.e. some
    user has more than MIN_SEQUENCE_LENGTH items (for a trainer to refuse before it writes anything)."""
    if not any(len(items) > MIN_SEQUENCE_LENGTH for items in dataset.sequences):
        raise LetterError(f"{source}: no training samples (one needs a user with at least {MIN_SEQUENCE_LENGTH + 1} "
                          "interactions: the last two are the validation and test targets)")


@dataclass
class Split:
    train: list[Sample]
    valid: list[Sample]
    test: list[Sample]
    max_history: int
    # user index (into Dataset.user_ids) of each valid/test sample; train samples are not tied to it
    eval_users: list[int]

    def part(self, name: str) -> list[Sample]:
        if name not in ("train", "valid", "test"):
            raise ValueError(f"split part must be train, valid or test, got {name!r}")
        return getattr(self, name)

    def sample_rows(self, name: str, max_users: int, seed: int) -> list[int]:
        """Positions in part(name) of an evaluation: all of them (max_users 0, or at least the
        part's size), or a fixed random sample of max_users, seeded by `seed`, in split order."""
        count = len(self.part(name))
        if 0 < max_users < count:
            return np.sort(np.random.default_rng(seed).choice(count, size=max_users, replace=False)).tolist()
        return list(range(count))

    def seen_items(self, dataset: Dataset, name: str, rows: list[int]) -> list[list[int]]:
        """Every item the user of each of part(name)'s samples at `rows` ("valid" or "test")
        interacted with before its target: the whole history in `dataset` (the one split), not
        only the last max_history items the sample holds (what a masked/excluded ranking rules out)."""
        if name not in ("valid", "test"):
            raise ValueError(f"seen items are those of valid or test samples, got {name!r}")
        drop = 1 if name == "test" else 2  # valid / test targets are the second-last / last items
        return [list(dataset.sequences[self.eval_users[i]][:-drop]) for i in rows]

    def tensors(self, name: str, pad: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        """(histories LongTensor [N, max_history] left-padded with `pad`, targets LongTensor [N])."""
        samples = self.part(name)
        return pad_left([h for h, _ in samples], self.max_history, pad), torch.tensor(
            [t for _, t in samples], dtype=torch.long
        )


def pad_left(histories: list[list[int]], length: int, pad: int = -1) -> torch.Tensor:
    """Stack histories into [N, length], keeping the last `length` items, padding on the left so the
    most recent item is always in the last column."""
    out = torch.full((len(histories), length), pad, dtype=torch.long)
    for row, history in enumerate(histories):
        tail = history[-length:] if length > 0 else []
        if tail:
            out[row, length - len(tail) :] = torch.tensor(tail, dtype=torch.long)
    return out


def drop_leading_padding(seq: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For left-padded rows (pad 0): drop the leading columns that are padding in every row of
    `seq`, in `seq` and `others` alike (the last column is always kept)."""
    nonempty = (seq != 0).any(0).nonzero()
    start = int(nonempty[0]) if len(nonempty) else seq.shape[1] - 1
    return tuple(t[:, start:] for t in (seq, *others))


def leave_one_out(dataset: Dataset, max_history: int = 20) -> Split:
    """Per user: test = items[:-1] -> items[-1], valid = items[:-2] -> items[-2], train = every
    prefix items[:i] -> items[i] for 1 <= i < len(items) - 2. Histories keep their last
    `max_history` items. Users with fewer than 3 items are skipped with a warning."""
    check_max_history(max_history)
    train, valid, test, eval_users = [], [], [], []
    short = 0
    for user, items in enumerate(dataset.sequences):
        if len(items) < MIN_SEQUENCE_LENGTH:
            short += 1
            continue
        head = items[:-2]
        for i in range(1, len(head)):
            train.append((head[max(0, i - max_history) : i], head[i]))
        valid.append((head[-max_history:], items[-2]))
        test.append((items[:-1][-max_history:], items[-1]))
        eval_users.append(user)
    if short:
        warnings.warn(
            LetterWarning(f"{dataset.name}: skipped {short} user(s) with fewer than {MIN_SEQUENCE_LENGTH} "
                          "interactions in the leave-one-out split"),
            stacklevel=2,
        )
    return Split(train, valid, test, max_history, eval_users)
