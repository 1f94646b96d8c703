"""A small, deterministic text corpus for the example: sentences from a seeded toy grammar, in shard files.

    python examples/dataset.py --out /tmp/bucket/data                   # 4 shards, 1 MiB in all, seed 0
    python examples/dataset.py --out file:///tmp/bucket/data --shards 8 --mib 4 --seed 1
    python examples/dataset.py --out s3://my-bucket/datasets/toy        # any fsspec URL the machine can write

It writes ``shard-000.txt``, ``shard-001.txt``, … (ASCII, one sentence a line, split into shards of equal
size, give or take a byte) and nothing else. The same seed gives the same bytes on every machine and Python
version (``random.Random`` seeded with a string is specified to be reproducible).

The language is learnable but not trivial, so a small model's loss falls well below what letter frequencies
alone give (the unigram entropy, ~2.9 nats per character here):

* words are spelt the same every time, so most letters follow from the ones before;
* the determiner and the verb agree with the noun in number ("a fox runs", "some foxes run", "every child sees
  the robots"), and "a" becomes "an" before a vowel ("an old owl");
* sentences of the kind "three plus four is seven ." need a little arithmetic (sums up to nine).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

DEFAULT_SHARDS = 4
DEFAULT_MIB = 1.0
SHARD_NAME = "shard-{:03d}.txt"

ADJECTIVES = ["small", "old", "red", "quiet", "clever", "lazy", "bright", "green", "hungry", "brave"]
NOUNS = [  # (singular, plural)
    ("cat", "cats"),
    ("dog", "dogs"),
    ("fox", "foxes"),
    ("bird", "birds"),
    ("child", "children"),
    ("robot", "robots"),
    ("teacher", "teachers"),
    ("farmer", "farmers"),
    ("owl", "owls"),
]
TRANSITIVE = [("sees", "see"), ("likes", "like"), ("follows", "follow"), ("finds", "find"), ("watches", "watch")]
INTRANSITIVE = [("sleeps", "sleep"), ("runs", "run"), ("sings", "sing"), ("waits", "wait")]
PLACES = ["in the garden", "near the river", "under the bridge", "on the hill", "at the market"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def noun_phrase(rng: random.Random) -> tuple[str, bool]:
    """A noun phrase and whether it is plural: "the old fox", "some birds", "every child"."""
    plural = rng.random() < 0.4
    singular_form, plural_form = rng.choice(NOUNS)
    determiner = rng.choice(["the", "some"] if plural else ["the", "a", "every"])
    words = [determiner]
    if rng.random() < 0.5:
        words.append(rng.choice(ADJECTIVES))
    words.append(plural_form if plural else singular_form)
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"  # "an old fox", "an owl"
    return " ".join(words), plural


def sentence(rng: random.Random) -> str:
    """One line of the corpus."""
    kind = rng.random()
    if kind < 0.15:  # a little arithmetic
        a = rng.randrange(10)
        b = rng.randrange(10 - a)
        return f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]} ."
    subject, plural = noun_phrase(rng)
    if kind < 0.6:
        verb = rng.choice(TRANSITIVE)[1 if plural else 0]
        obj, _ = noun_phrase(rng)
        words = [subject, verb, obj]
    else:
        words = [subject, rng.choice(INTRANSITIVE)[1 if plural else 0]]
    if rng.random() < 0.3:
        words.append(rng.choice(PLACES))
    return " ".join(words) + " ."


def shard_sizes(total_bytes: int, shards: int) -> list[int]:
    """``total_bytes`` split into ``shards`` sizes that differ by at most one byte (the larger ones first)."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    base, extra = divmod(total_bytes, shards)
    return [base + (1 if i < extra else 0) for i in range(shards)]


def generate_shard(seed: int, index: int, size: int) -> bytes:
    """Shard ``index`` of the corpus for ``seed``: exactly ``size`` bytes (the last line may be cut short).

    Each shard has its own random stream, so shards can be made independently, in any order.
    """
    rng = random.Random(f"podtrain-example:{seed}:{index}")
    lines: list[str] = []
    length = 0
    while length < size:
        line = sentence(rng) + "\n"
        lines.append(line)
        length += len(line)
    return "".join(lines).encode("ascii")[:size]


def write_dataset(out: str, *, shards: int = DEFAULT_SHARDS, mib: float = DEFAULT_MIB, seed: int = 0) -> list[str]:
    """Write the shards into ``out`` (a folder, or an fsspec URL such as ``file://…`` or ``s3://…``).

    Returns the written locations. A local folder is created if needed; each file appears whole (written
    beside it, then renamed), so a reader never sees half a shard.
    """
    total = round(mib * 2**20)
    if total < shards:
        raise ValueError(f"--mib {mib} is too small for {shards} shards")
    written = []
    for index, size in enumerate(shard_sizes(total, shards)):
        data = generate_shard(seed, index, size)
        name = SHARD_NAME.format(index)
        if "://" in out:
            from sdk.stores.store import open_store  # podtrain's store: retries and CRC32C, any scheme it knows

            store = open_store(out)
            store.put(name, data)
            written.append(store.url_of(name))
        else:
            folder = Path(out)
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f".{name}.partial"
            partial.write_bytes(data)
            partial.replace(folder / name)
            written.append(str(folder / name))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a folder or an fsspec URL (file://, s3://, gs://, …)")
    parser.add_argument("--shards", type=int, default=DEFAULT_SHARDS, help="number of shard files (default 4)")
    parser.add_argument(
        "--mib", type=float, default=DEFAULT_MIB, help="total size in MiB, split evenly over the shards (default 1)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same bytes (default 0)")
    args = parser.parse_args(argv)
    written = write_dataset(args.out, shards=args.shards, mib=args.mib, seed=args.seed)
    print(f"wrote {len(written)} shards, {round(args.mib * 2**20)} bytes in all, to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
