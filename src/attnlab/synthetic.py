"""Synthetic diagnostics in the zoology style: multi-query associative recall (MQAR) and induction copying.

MQAR is the recall task of zoology (Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient
Language Models", arXiv 2312.04927): a sequence lists key-value pairs, then asks for keys seen earlier; the
answer is the value paired with that key. Dot-product attention solves it in two layers (a previous-token
step, then a key match), mixers without content-based lookup cannot. Induction copying (a random prefix, then
the same prefix again; Olsson et al. 2022) is the simplest form of in-context copying.

Every example is a pair (input_ids [seq_len], labels [seq_len]) in the convention of `model(input_ids,
labels)`: the model shifts internally (labels[t + 1] is predicted from position t), and every label not to
be scored is `IGNORE_INDEX` (-100). A label at position t + 1 scores the prediction made at position t.

Examples are generated on the fly and are deterministic: example `index` of stream `stream` ("train" or
"heldout") under seed `seed` is drawn from a `torch.Generator` seeded by a hash of (seed, stream, index),
so it never depends on batch size, rank or call order. The held-out set is the first examples of the
"heldout" stream.

Task specs (`attnlab train --data SPEC`; the sequence length comes from `train.seq_len`):

    mqar[:vocab=64,pairs=4,queries=4,filler=blank]   queries: a count, or `fill` (every free slot)
    induction[:vocab=64,prefix=L/2]
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .losses import IGNORE_INDEX

BLANK_TOKEN = 0  # MQAR: the token after each query key, and the filler between queries when filler=blank
STREAMS = ("train", "heldout")


# ----------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class MQARTask:
    """Multi-query associative recall (zoology MQAR, Arora et al. 2023), one example of length `seq_len`:

        k_1 v_1 k_2 v_2 … k_P v_P | slot slot … slot

    The context holds `num_pairs` distinct keys, each followed by its value (values are distinct too). The
    query region after it is cut into two-token slots; `num_queries` slots, chosen uniformly at random,
    hold a query `k _` (a context key, then the blank token, whose label is the key's value: the model must
    predict it from the key's position), the others filler (blank tokens, or with `filler="noise"` random
    tokens from a noise range that is neither keys nor values); an odd leftover last token is filler.
    Queries visit the keys in random order, each key once per round of `num_pairs` queries (so with
    queries <= pairs, as zoology, no key is asked twice).

    As in zoology, answers never appear in the input: were they written after their queries, an answer could
    be inferred without recall, by elimination (the last key of a round has the one value not yet answered).

    Vocabulary: token 0 is the blank; keys are [1, 1 + n), values [1 + n, 1 + 2n), noise tokens the rest,
    with n = (vocab_size - 1) // 2 (blank filler) or (vocab_size - 1) // 3 (noise filler).
    """

    seq_len: int
    vocab_size: int = 64
    num_pairs: int = 4
    num_queries: int | str | None = None  # a count; None: one query per key (zoology's default); "fill": every slot
    filler: str = "blank"  # blank | noise

    name: ClassVar[str] = "mqar"

    def __post_init__(self) -> None:
        if self.filler not in ("blank", "noise"):
            raise ValueError(f"mqar filler must be blank or noise, got {self.filler!r}")
        _check_positive(self, "seq_len", "vocab_size", "num_pairs")
        if self.num_queries in (None, "fill"):
            object.__setattr__(self, "num_queries", self.num_pairs if self.num_queries is None else self.num_slots)
        _check_positive(self, "num_queries")
        if self.num_pairs > self.keys_per_range:
            raise ValueError(
                f"mqar pairs={self.num_pairs} needs that many distinct keys and values, but vocab={self.vocab_size} "
                f"gives {self.keys_per_range} of each (filler={self.filler}); raise vocab or lower pairs"
            )
        if self.num_queries > self.num_slots:
            raise ValueError(
                f"mqar needs 2·pairs + 2·queries = {2 * self.num_pairs + 2 * self.num_queries} tokens but seq_len is "
                f"{self.seq_len} (room for {self.num_slots} queries); raise --seq-len or lower pairs/queries"
            )

    @property
    def keys_per_range(self) -> int:
        """n: the number of key tokens (and of value tokens)."""
        return (self.vocab_size - 1) // (3 if self.filler == "noise" else 2)

    @property
    def num_slots(self) -> int:
        """Two-token slots in the query region after the 2·pairs context tokens."""
        return max(0, (self.seq_len - 2 * self.num_pairs) // 2)

    @property
    def chance_accuracy(self) -> float:
        """Accuracy of guessing uniformly among the value tokens (a mixer that cannot look back)."""
        return 1.0 / self.keys_per_range

    @property
    def context_guess_accuracy(self) -> float:
        """Accuracy of guessing among the values present in the context, without recalling which key they
        belong to: where mixers that see the context but cannot match keys by content end up."""
        return 1.0 / self.num_pairs

    @property
    def spec(self) -> str:
        return f"mqar:vocab={self.vocab_size},pairs={self.num_pairs},queries={self.num_queries},filler={self.filler}"

    @property
    def _draw_sizes(self) -> list[int]:
        """Uniform draws per example, by use: key and value permutations, query rounds, slots, noise tokens."""
        rounds = math.ceil(self.num_queries / self.num_pairs)
        noise = self.seq_len if self.filler == "noise" else 0
        return [self.keys_per_range, self.keys_per_range, rounds * self.num_pairs, self.num_slots, noise]

    @property
    def num_uniforms(self) -> int:
        return sum(self._draw_sizes)

    def build(self, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples from their uniform draws [batch, num_uniforms] (float64): (input_ids, labels), int64
        [batch, seq_len] each. A permutation is the argsort of uniforms."""
        n, pairs, queries = self.keys_per_range, self.num_pairs, self.num_queries
        rounds = math.ceil(queries / pairs)
        key_draws, value_draws, round_draws, slot_draws, noise_draws = uniforms.split(self._draw_sizes, dim=1)
        batch = len(uniforms)
        keys = 1 + key_draws.argsort(dim=1)[:, :pairs]  # [batch, pairs], distinct
        values = 1 + n + value_draws.argsort(dim=1)[:, :pairs]  # [batch, pairs], distinct
        # Which pair each query asks for: every key once per round, rounds concatenated.
        asked = round_draws.view(batch, rounds, pairs).argsort(dim=2).view(batch, -1)[:, :queries]  # [batch, queries]
        slots = slot_draws.argsort(dim=1)[:, :queries]  # [batch, queries]

        if self.filler == "noise":
            noise_tokens = self.vocab_size - (1 + 2 * n)
            input_ids = 1 + 2 * n + (noise_draws * noise_tokens).long()  # [batch, seq_len]
        else:
            input_ids = torch.full((batch, self.seq_len), BLANK_TOKEN, dtype=torch.long)
        input_ids[:, 0 : 2 * pairs : 2] = keys
        input_ids[:, 1 : 2 * pairs : 2] = values
        query_positions = 2 * pairs + 2 * slots  # [batch, queries]: the query key; its answer is scored next
        input_ids.scatter_(1, query_positions, keys.gather(1, asked))
        input_ids.scatter_(1, query_positions + 1, BLANK_TOKEN)
        labels = torch.full((batch, self.seq_len), IGNORE_INDEX, dtype=torch.long)
        labels.scatter_(1, query_positions + 1, values.gather(1, asked))
        return input_ids, labels


@dataclass(frozen=True)
class InductionTask:
    """Induction-head copying (Olsson et al. 2022): `prefix_len` uniform random tokens, then the same tokens
    again, repeated until `seq_len`. Scored: every token of the copy whose predecessor is in the copy too
    (positions prefix_len + 1 …), i.e. the predictions made from inside the repeated part."""

    seq_len: int
    vocab_size: int = 64
    prefix_len: int | None = None  # None: half the sequence

    name: ClassVar[str] = "induction"

    def __post_init__(self) -> None:
        _check_positive(self, "seq_len", "vocab_size")
        if self.prefix_len is None:
            object.__setattr__(self, "prefix_len", self.seq_len // 2)
        _check_positive(self, "prefix_len")
        if self.prefix_len + 2 > self.seq_len:
            raise ValueError(
                f"induction prefix={self.prefix_len} leaves nothing to score in seq_len={self.seq_len}; "
                "the sequence needs at least prefix + 2 tokens"
            )

    @property
    def chance_accuracy(self) -> float:
        return 1.0 / self.vocab_size

    @property
    def context_guess_accuracy(self) -> float:
        """A model that cannot copy guesses uniformly: the same as chance."""
        return self.chance_accuracy

    @property
    def spec(self) -> str:
        return f"induction:vocab={self.vocab_size},prefix={self.prefix_len}"

    @property
    def num_uniforms(self) -> int:
        return self.prefix_len

    def build(self, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples from their uniform draws [batch, prefix_len] (float64): (input_ids, labels) [batch, seq_len]."""
        prefix = (uniforms * self.vocab_size).long()  # [batch, prefix_len]
        input_ids = prefix.repeat(1, math.ceil(self.seq_len / self.prefix_len))[:, : self.seq_len]  # [batch, seq_len]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, self.prefix_len + 1 :] = input_ids[:, self.prefix_len + 1 :]
        return input_ids, labels


SyntheticTask = MQARTask | InductionTask

# Spec keys of each task → (dataclass field, parser of the value).
_SPEC_KEYS = {
    "mqar": {
        "vocab": ("vocab_size", int),
        "pairs": ("num_pairs", int),
        "queries": ("num_queries", lambda text: text if text == "fill" else int(text)),
        "filler": ("filler", str),
    },
    "induction": {"vocab": ("vocab_size", int), "prefix": ("prefix_len", int)},
}
_TASKS = {"mqar": MQARTask, "induction": InductionTask}


def is_task_spec(data: str) -> bool:
    """Whether a `--data` value names a synthetic task rather than a corpus."""
    return data.partition(":")[0].strip() in _TASKS


def parse_task_spec(spec: str, seq_len: int) -> SyntheticTask:
    """`mqar:pairs=8,queries=8,vocab=256` → MQARTask(seq_len, …); one ValueError for any bad input."""
    name, _, options = (part.strip() for part in spec.partition(":"))
    if name not in _TASKS:
        raise ValueError(f"unknown synthetic task {name!r} in {spec!r}; valid tasks: {', '.join(_TASKS)}")
    keys = _SPEC_KEYS[name]
    usage = f"write {name}:key=value,… with keys {', '.join(keys)}"
    values = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, equals, text = (part.strip() for part in item.partition("="))
        if not equals or key not in keys:
            raise ValueError(f"bad option {item!r} in synthetic task {spec!r}; {usage}")
        if key in values:
            raise ValueError(f"option {key!r} given twice in synthetic task {spec!r}")
        field, parse = keys[key]
        try:
            values[key] = (field, parse(text))
        except ValueError:
            raise ValueError(f"bad value {text!r} for {key} in synthetic task {spec!r}; {usage}") from None
    try:
        return _TASKS[name](seq_len=seq_len, **dict(values.values()))
    except ValueError as error:
        raise ValueError(f"synthetic task {spec!r}: {error}") from None


def _check_positive(task, *names: str) -> None:
    for name in names:
        value = getattr(task, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{task.name} {name} must be a positive integer, got {value!r}")


# ------------------------------------------------------------------------------------------- examples


def example_seed(seed: int, stream: str, index: int) -> int:
    """The generator seed of one example: a hash of (seed, stream, index), 63 bits."""
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
    digest = hashlib.blake2b(f"{seed}/{stream}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def make_examples(task: SyntheticTask, seed: int, stream: str, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples `indices` of a stream: (input_ids, labels), int64 [len(indices), seq_len] each.

    Example i is built from `task.num_uniforms` float64 uniforms of a generator seeded with
    `example_seed(seed, stream, i)`, so it is the same whichever batch it comes in."""
    indices = list(indices)
    uniforms = torch.empty(len(indices), task.num_uniforms, dtype=torch.float64)  # [batch, num_uniforms]
    generator = torch.Generator(device="cpu")
    for row, index in enumerate(indices):
        generator.manual_seed(example_seed(seed, stream, int(index)))
        torch.rand(task.num_uniforms, generator=generator, dtype=torch.float64, out=uniforms[row])
    return task.build(uniforms)


def heldout_examples(task: SyntheticTask, seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed held-out set: the first `count` examples of the "heldout" stream, [count, seq_len] each."""
    return make_examples(task, seed, "heldout", range(count))


def first_tokens(task: SyntheticTask, seed: int, length: int) -> list[int]:
    """The first `length` input tokens of the training stream, examples 0, 1, … laid end to end (the
    `fixedseqqk` shadow sequence of a model trained on the task)."""
    count = math.ceil(length / task.seq_len)
    inputs, _ = make_examples(task, seed, "train", range(count))
    return inputs.flatten()[:length].tolist()


class SyntheticTrainStream:
    """Training batches of a synthetic task for one rank, with the interface of `data.TrainStream`, except
    that `next_batch` gives (input_ids, labels).

    As `PackedTrainStream`, one global cursor counts the examples consumed by all ranks together: on rank r
    of W, `next_batch(b)` returns examples [cursor + r·b, cursor + (r + 1)·b) and advances the cursor by W·b.
    So the ranks see distinct examples, together exactly those one process would see, and the cursor (the
    same on every rank) is the whole state. The stream is endless: `epoch` stays 0.
    """

    tokens_per_epoch = None
    epoch = 0

    def __init__(self, task: SyntheticTask, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.task, self.seed, self.rank, self.world_size = task, seed, rank, world_size
        self.seq_len = task.seq_len
        self.cursor = 0  # examples consumed by all ranks together

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next `batch_size` examples: (input_ids, labels), int64 [batch_size, seq_len] each."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        start = self.cursor + self.rank * batch_size
        self.cursor += self.world_size * batch_size
        return make_examples(self.task, self.seed, "train", range(start, start + batch_size))

    def _identity(self) -> dict:
        return {"kind": "synthetic", "task": self.task.spec, "seq_len": self.seq_len, "seed": self.seed}

    def state_dict(self) -> dict:
        return {**self._identity(), "cursor": self.cursor, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise ValueError(
                    f"cannot resume the data stream: the checkpoint has {key}={state.get(key)!r} but this run has "
                    f"{value!r}; resume with the same data, seq_len and seed"
                )
        self.cursor = int(state["cursor"])


# ----------------------------------------------------------------------------------------- evaluation


def evaluate_examples(
    model, input_ids: torch.Tensor, labels: torch.Tensor, batch_size: int, device: torch.device | str
) -> dict[str, float | int]:
    """Loss and accuracy of `model` at the scored positions of examples [n, seq_len] (under no_grad).

    A scored label labels[t + 1] counts as correct when the argmax of the logits at position t equals it.
    Returns `loss` (mean cross-entropy over scored labels), `accuracy`, `stderr` (its standard error, with
    the examples as independent units: the scored positions of one example are not independent), and the
    counts `correct`, `scored`, `examples`.
    """
    was_training = model.training
    model.eval()
    loss_sum, correct_per_example, scored_per_example = 0.0, [], []
    with torch.no_grad():
        for start in range(0, len(input_ids), batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            targets = labels[start : start + batch_size, 1:].to(device)  # [batch, seq - 1]
            logits = model(input_ids=batch).logits[:, :-1].float()  # [batch, seq - 1, vocab]
            scored = targets != IGNORE_INDEX
            loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum")
            loss_sum += loss.item()
            correct_per_example.append(((logits.argmax(-1) == targets) & scored).sum(1).cpu())
            scored_per_example.append(scored.sum(1).cpu())
    model.train(was_training)
    correct = torch.cat(correct_per_example).double()  # [n]
    scored = torch.cat(scored_per_example).double()  # [n]
    total_scored = scored.sum().item()
    accuracy = correct.sum().item() / total_scored
    examples = len(correct)
    # Ratio-estimator standard error over examples (= std of per-example accuracy / sqrt(n) when every
    # example has the same number of scored labels, as in both tasks).
    residuals = correct - accuracy * scored
    stderr = (
        math.sqrt((residuals**2).sum().item() / (examples * (examples - 1))) / scored.mean().item()
        if examples > 1
        else math.nan
    )
    return {
        "loss": loss_sum / total_scored,
        "accuracy": accuracy,
        "stderr": stderr,
        "correct": int(correct.sum().item()),
        "scored": int(total_scored),
        "examples": examples,
    }


def recall_accuracy(
    model, task: SyntheticTask, num_examples: int, batch_size: int, device: torch.device | str, seed: int = 0
) -> dict[str, float | int]:
    """Accuracy of `model` on the first `num_examples` held-out examples of `task` (see `evaluate_examples`
    for the keys of the result)."""
    if num_examples < 1:
        raise ValueError(f"num_examples must be positive, got {num_examples}")
    input_ids, labels = heldout_examples(task, seed, num_examples)
    return evaluate_examples(model, input_ids, labels, batch_size, device)


__all__ = [
    "BLANK_TOKEN",
    "InductionTask",
    "MQARTask",
    "SyntheticTask",
    "SyntheticTrainStream",
    "evaluate_examples",
    "example_seed",
    "first_tokens",
    "heldout_examples",
    "is_task_spec",
    "make_examples",
    "parse_task_spec",
    "recall_accuracy",
]
