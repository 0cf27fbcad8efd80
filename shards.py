"""
The token files prepare_data.py writes, opened without loading them: the pretraining shards ({split}_000.bin,
... with a .json sidecar each) as random windows, which pretrain.py trains on and sft.py replays (--replay_rows);
and the SFT and DPO splits, whose readers are sft.py's and dpo.py's.
"""
import glob
import json
import os

import numpy as np

from checkpoint import check_tokenizer


def masked_split(data_dir, kind, split, tok, items):
    """(path prefix, offsets) of an SFT or DPO split ({kind}_{split}.bin, _mask.bin, _index.npy, .json): sequence i
    is tokens[offsets[i]:offsets[i + 1]]. Refused in one line where it is missing, empty or of another tokenizer."""
    prefix = os.path.join(data_dir, f"{kind}_{split}")
    if not os.path.exists(prefix + "_index.npy"):
        raise SystemExit(f"error: no {kind.upper()} {split} data in {data_dir}/; run `python prepare_data.py` "
                         f"(with --{kind}_input=... for your own {items})")
    with open(prefix + ".json") as f:
        check_tokenizer(json.load(f)["tokenizer_sha"], tok.sha, prefix + ".bin",
                        fix="point --init_from at a model trained with this data's tokenizer")
    offsets = np.load(prefix + "_index.npy")
    if len(offsets) == 1:
        raise SystemExit(f"error: {prefix}.bin holds no {items}: prepare_data.py put none into the {split} split; "
                         f"raise its --val_fraction or add {items}")
    return prefix, offsets


class TokenShards:
    """One split's uint16 shards ({split}_000.bin, ...), read as random windows without loading them."""

    def __init__(self, data_dir, split, tokenizer_sha, what=""):
        self.paths = sorted(glob.glob(os.path.join(data_dir, f"{split}_[0-9][0-9][0-9].bin")))
        if not self.paths:
            raise SystemExit(f"error: no {split} token files in {data_dir}/" + (f" for {what}" if what else "") +
                             "; run `python prepare_data.py` first (or point --data_dir at its output)")
        self.sizes, self.chars = [], 0
        for path in self.paths:
            meta_path = path[:-len(".bin")] + ".json"
            if not os.path.exists(meta_path):
                raise SystemExit(f"error: {path} has no sidecar {meta_path}; re-run prepare_data.py")
            with open(meta_path) as f:
                meta = json.load(f)
            check_tokenizer(meta["tokenizer_sha"], tokenizer_sha, path)
            self.sizes.append(os.path.getsize(path) // 2)
            self.chars += meta["chars"]
        self.sizes = np.array(self.sizes)
        self.tokens_per_char = self.sizes.sum() / max(1, self.chars)

    def check_fits(self, block_size):
        if (self.sizes > block_size + 1).sum() == 0:
            raise SystemExit(f"error: block_size={block_size} does not fit the data in {self.paths[0]} "
                             f"({self.sizes.max()} tokens); lower --block_size or prepare more data")

    def document_starts(self, bos_id, block_size):
        """Per shard, the positions of its documents' first tokens (BOS) where a whole window still fits."""
        starts = []
        for path, size in zip(self.paths, self.sizes):
            data, found = np.memmap(path, dtype=np.uint16, mode="r"), []
            for lo in range(0, size, 1 << 24):  # in chunks: shards hold up to hundreds of millions of tokens
                found.append(lo + np.flatnonzero(data[lo:lo + (1 << 24)] == bos_id))
            found = np.concatenate(found)
            starts.append(found[found + block_size + 1 <= size])
        if not sum(len(s) for s in starts):
            raise SystemExit(f"error: no document in {self.paths[0]} and the others starts a whole window of "
                             f"{block_size} tokens; lower --block_size, or --document_rows=False")
        return starts

    def batch(self, rng, batch_size, block_size, doc_starts=None):
        """(batch_size, block_size + 1) int64 windows: x is [:, :-1], y [:, 1:]. They start anywhere, or at one
        of doc_starts (document_starts()) if given."""
        if doc_starts is None:
            starts_per_shard = np.maximum(self.sizes - block_size - 1, 0)  # a window must fit inside its shard
        else:
            starts_per_shard = np.array([len(s) for s in doc_starts])
        shard = rng.choice(len(self.paths), size=batch_size, p=starts_per_shard / starts_per_shard.sum())
        offset = rng.integers(0, starts_per_shard[shard])
        if doc_starts is not None:
            offset = np.array([doc_starts[s][i] for s, i in zip(shard, offset)])
        windows = np.empty((batch_size, block_size + 1), dtype=np.int64)
        for s in np.unique(shard):
            # a fresh memmap per batch: a long-lived one keeps every page it touched in RSS
            data = np.memmap(self.paths[s], dtype=np.uint16, mode="r")
            for row in np.flatnonzero(shard == s):
                windows[row] = data[offset[row]:offset[row] + block_size + 1]
        return windows
