"""The grain pipeline: documents -> tokens -> next-token examples -> packed rows -> batches.

A document becomes [bos] + tokens + [eos], cut into chunks of seq_len + 1 tokens that
overlap by one; a chunk gives inputs = chunk[:-1], targets = chunk[1:]. Examples are
packed first-fit into rows of seq_len with segment ids (1, 2, ... per example, 0 for
padding) and positions (0, 1, ... within each example), so attention and the loss
(mask: segment_ids > 0, targets not IGNORE) never cross examples. Evaluation rows also
carry `target_bytes`: how many bytes of the document's text each target token stands
for (`Tokenizer.encode_counted`; 0 for padding, and for the eos but bytes no token
stands for), so bits per byte are exact for any tokenizer. A source of token-id rows
(`DataSource.tokenizer`) gives whole rows already: they are shuffled, dealt and batched
as they are.
"""

from __future__ import annotations

import functools
import json

import grain
import numpy as np

from efflm.data.sources import SOURCES, make_source, mixture_parts
from efflm.errors import DataError

# Documents are read and tokenized in the calling thread: on local files, reader threads
# measured no faster (the packer dominates). Threads would keep the state exact too.
READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
# Training examples are shuffled in windows of about this many tokens before packing, so
# that a batch mixes many documents rather than consecutive chunks of one file.
SHUFFLE_WINDOW_TOKENS = 2**20
KEYS = ("inputs", "targets", "segment_ids", "positions")


def encode_document(tokenizer, text: str, counted: bool = False):
    """[bos] + tokens + [eos] as int32; `counted`: {"tokens": those, "bytes": each
    token's bytes of text (0 for bos and eos)}."""
    if not counted:
        ids = tokenizer.encode(text)
        return np.concatenate([[tokenizer.bos_id], ids, [tokenizer.eos_id]]).astype(np.int32)
    ids, nbytes = tokenizer.encode_counted(text)
    # Bytes no token stands for (a text its normaliser removes whole) go to the eos.
    rest = len(text.encode("utf-8", errors="replace")) - int(nbytes.sum())
    return {"tokens": np.concatenate([[tokenizer.bos_id], ids, [tokenizer.eos_id]]
                                     ).astype(np.int32),
            "bytes": np.concatenate([[0], nbytes, [rest]]).astype(np.int32)}


class ChunkDocument(grain.experimental.FlatMapTransform):
    """Cuts a tokenized document into examples of at most seq_len next-token pairs."""

    max_fan_out = 2**31  # not used by the iterator version of flat map

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, document) -> list[dict]:
        """`document`: encode_document's tokens, or its counted dict (then each example
        also has `target_bytes`)."""
        counted = isinstance(document, dict)
        tokens = document["tokens"] if counted else document
        out = []
        for start in range(0, len(tokens) - 1, self.seq_len):
            stop = start + self.seq_len + 1
            chunk = tokens[start:stop]
            out.append({"inputs": chunk[:-1], "targets": chunk[1:]})
            if counted:
                out[-1]["target_bytes"] = document["bytes"][start + 1:stop]
        return out


def _to_row(packed: dict) -> dict:
    row = {"inputs": packed["inputs"], "targets": packed["targets"],
           "segment_ids": packed["inputs_segment_ids"],
           "positions": packed["inputs_positions"]}
    if "target_bytes" in packed:
        row["target_bytes"] = packed["target_bytes"]
    return row


def examples(docs: grain.MapDataset, tokenizer, seq_len: int,
             counted: bool = False) -> grain.IterDataset:
    """Next-token examples {"inputs", "targets"} (int32, length <= seq_len) from texts;
    `counted`: with `target_bytes`."""
    ds = docs.map(functools.partial(encode_document, tokenizer, counted=counted))
    return grain.experimental.FlatMapIterDataset(ds.to_iter_dataset(READ_OPTIONS),
                                                 ChunkDocument(seq_len))


def pack(ds: grain.IterDataset, tokenizer, seq_len: int, num_bins: int,
         counted: bool = False) -> grain.IterDataset:
    """Rows of int32 [seq_len]: examples packed first-fit into `num_bins` rows at a time."""
    features = ("inputs", "targets", "target_bytes") if counted else ("inputs", "targets")
    pad = {k: 0 if k == "target_bytes" else tokenizer.pad_id for k in features}
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={k: seq_len for k in features}, num_packing_bins=num_bins,
        shuffle_bins=False, padding_struct=pad)
    return ds.map(_to_row)


def _token_rows(cfg) -> bool:
    """Whether `data.source` yields whole rows of token ids."""
    return cfg.source in SOURCES and SOURCES[cfg.source].tokenizer(cfg) is not None


def _local_batch(global_batch: int, process_index: int, process_count: int) -> int:
    if global_batch <= 0:
        raise DataError(f"the global batch must be positive, got {global_batch}")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} must be in [0, {process_count})")
    if global_batch % process_count:
        raise DataError(f"the global batch size {global_batch} (train.batch_size) is not "
                        f"divisible by the number of processes ({process_count}); use a "
                        f"multiple of {process_count}")
    return global_batch // process_count


def _derive_seed(seed: int, stream: int) -> int:
    """A seed in [0, 2**31) for one random stream of the pipeline."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0] >> 1)


class DataIterator:
    """Batches from a grain iterator, with a JSON-serialisable, checked state."""

    def __init__(self, dataset: grain.IterDataset, spec: dict):
        self._iterator = iter(dataset)
        self.spec = spec

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._iterator)

    def get_state(self) -> dict:
        state = json.loads(json.dumps(self._iterator.get_state()))
        return {"spec": dict(self.spec), "grain": state}

    def set_state(self, state: dict) -> None:
        spec = state.get("spec", {})
        diff = [f"{SPEC_NAMES.get(k, k)}: saved {spec.get(k)!r}, now {v!r}"
                for k, v in self.spec.items() if spec.get(k) != v]
        if diff:
            raise DataError("the saved data iterator state does not fit this pipeline ("
                            + "; ".join(diff) + "); to resume, set these back to their "
                            "saved values")
        self._iterator.set_state(state["grain"])


# What each field of an iterator's spec is called in the config.
SPEC_NAMES = {"seq_len": "data.seq_len", "global_batch": "train.batch_size",
              "seed": "train.seed", "source": "data.source",
              "process_count": "number of processes", "process_index": "process index"}


def train_batches(cfg, tokenizer, *, global_batch: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> tuple[grain.IterDataset, dict]:
    """The grain dataset of this process's training batches, and its spec (what a
    resumed iterator must match).

    Documents are shuffled with `seed` (a new order each epoch) and dealt round-robin
    to processes, so processes read disjoint documents; their examples are shuffled in
    windows of about SHUFFLE_WINDOW_TOKENS tokens before packing.
    """
    local = _local_batch(global_batch, process_index, process_count)

    def documents(data_cfg, stream: int):
        source = make_source(data_cfg, "train")
        docs = grain.MapDataset.source(source).shuffle(seed=_derive_seed(seed, stream))
        return docs.repeat()[process_index::process_count], len(source)

    parts = mixture_parts(cfg) if cfg.source in SOURCES else None
    if _token_rows(cfg):
        rows = documents(cfg, 0)[0].to_iter_dataset(READ_OPTIONS)
    else:
        if parts:  # a mixture: each source's examples, interleaved by weight
            streams = [documents(sub, 10 + i) for i, (_, _, sub) in enumerate(parts)]
            ds = grain.IterDataset.mix([examples(d, tokenizer, cfg.seq_len) for d, _ in streams],
                                       [w for _, w, _ in parts])
            num_docs = sum(n for _, n in streams)
        else:
            docs, num_docs = documents(cfg, 0)
            ds = examples(docs, tokenizer, cfg.seq_len)
        # At most one epoch's worth of examples (each document gives at least one), so
        # that a small corpus does not mix many epochs in one window.
        window = max(1, min(SHUFFLE_WINDOW_TOKENS // cfg.seq_len, num_docs // process_count))
        ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=window,
                                                         seed=_derive_seed(seed, 1))
        rows = pack(ds, tokenizer, cfg.seq_len, local)
    spec = {"split": "train", "source": cfg.source, "seq_len": cfg.seq_len,
            "global_batch": global_batch, "seed": seed, "process_index": process_index,
            "process_count": process_count}
    return rows.batch(local, drop_remainder=True), spec


def make_train_iterator(cfg, tokenizer, **kw) -> DataIterator:
    """Endless, checkpointable batches of packed training rows for this process
    (`train_batches`; keyword arguments global_batch, seed, process_index,
    process_count)."""
    return DataIterator(*train_batches(cfg, tokenizer, **kw))


def _pad_and_shard(batch: dict, *, global_batch: int, pad_id: int, start: int,
                   stop: int) -> dict:
    """Pads a short last batch with all-padding rows, then takes rows [start, stop)."""
    missing = global_batch - len(batch["inputs"])
    out = {}
    for key in batch:
        fill = pad_id if key in ("inputs", "targets") else 0
        rows = np.pad(batch[key], ((0, missing), (0, 0)), constant_values=fill)
        out[key] = rows[start:stop]
    return out


# The in-run evaluation sample is drawn with this seed, whatever train.seed is, so that
# runs on the same data evaluate on the same windows.
EVAL_SAMPLE_SEED = 0
_EXAMPLE_COUNTS: dict = {}


def examples_per_document(cfg, tokenizer, source) -> np.ndarray:
    """How many examples each document of the validation `source` gives (cached)."""
    key = (repr(cfg), tokenizer.fingerprint)
    if key not in _EXAMPLE_COUNTS:
        lengths = [len(encode_document(tokenizer, source[i])) for i in range(len(source))]
        _EXAMPLE_COUNTS[key] = -(-(np.array(lengths, np.int64) - 1) // cfg.seq_len)
    return _EXAMPLE_COUNTS[key]


class SampledExamples:
    """A fixed, seeded sample of `count` examples drawn uniformly from all examples of
    the validation split, in split order (a random-access source for grain)."""

    def __init__(self, cfg, tokenizer, count: int):
        self.source, self.tokenizer = make_source(cfg, "val"), tokenizer
        self.chunk = ChunkDocument(cfg.seq_len)
        counts = examples_per_document(cfg, tokenizer, self.source)
        starts = np.concatenate([[0], np.cumsum(counts)])
        rng = np.random.default_rng(_derive_seed(EVAL_SAMPLE_SEED, 2))
        total = int(starts[-1])
        chosen = np.sort(rng.choice(total, size=min(count, total), replace=False))
        self.docs = np.searchsorted(starts, chosen, side="right") - 1
        self.parts = chosen - starts[self.docs]
        self._cached = (-1, None)

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, index: int) -> dict:
        doc = int(self.docs[index])
        if self._cached[0] != doc:  # the sample is sorted: one document at a time
            text = self.source[doc]
            self._cached = (doc, self.chunk.flat_map(
                encode_document(self.tokenizer, text, counted=True)))
        return self._cached[1][int(self.parts[index])]


def make_eval_iterator(cfg, tokenizer, *, global_batch: int, process_index: int = 0,
                       process_count: int = 1, num_batches: int = 0) -> DataIterator:
    """Full-shape validation batches: with `num_batches` 0, one pass over every
    validation document in order; else at most `num_batches` batches packed from a fixed
    sample of num_batches * global_batch examples drawn from across the whole split
    (the same for every call, so every in-run evaluation sees the same windows).

    Every process packs the same global batches and keeps its own rows, so all
    processes see the same number of batches; the last is padded with empty rows.
    """
    local = _local_batch(global_batch, process_index, process_count)
    if num_batches < 0:
        raise DataError(f"the number of evaluation batches must be >= 0, got {num_batches}")
    if _token_rows(cfg):  # the first num_batches batches (generated rows: no order)
        rows = grain.MapDataset.source(make_source(cfg, "val"))
        if num_batches:
            rows = rows[:num_batches * global_batch]
        rows = rows.to_iter_dataset(READ_OPTIONS)
    else:
        if num_batches:
            sample = SampledExamples(cfg, tokenizer, num_batches * global_batch)
            ds = grain.MapDataset.source(sample).to_iter_dataset(READ_OPTIONS)
        else:
            ds = examples(grain.MapDataset.source(make_source(cfg, "val")), tokenizer,
                          cfg.seq_len, counted=True)
        rows = pack(ds, tokenizer, cfg.seq_len, global_batch, counted=True)
    shard = functools.partial(_pad_and_shard, global_batch=global_batch,
                              pad_id=tokenizer.pad_id, start=process_index * local,
                              stop=(process_index + 1) * local)
    spec = {"split": "val", "source": cfg.source, "seq_len": cfg.seq_len,
            "global_batch": global_batch, "process_index": process_index,
            "process_count": process_count, "num_batches": num_batches}
    return DataIterator(rows.batch(global_batch).map(shard), spec)
