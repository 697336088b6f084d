"""The data stages at scale: `download` and `tokenizer` (the real stage scripts) on corpora of 0.1, 1 and 5 GB,
beside SentencePiece's own encode speed on the same text with the same threads, measured in the same run
(the limit: no tokenizer stage can encode faster).

    python bench/bench_data.py                         # 0.1 and 1 GB of generated code
    python bench/bench_data.py --sizes 5 --workdir /mnt/big/bench-data
    python bench/bench_data.py --source ~/corpora/stack.jsonl.zst --group-by ''   # a corpus of your own
    python bench/bench_data.py --ladder --steps 60 --eval-tokens 150000    # then the whole ladder, small budgets
    python bench/bench_data.py --source ~/corpora/python-src.parquet --ladder --steps 0  # docs/data.md's recipe

A generated corpus is every .py file of this Python installation (stdlib and site-packages, about 300 MB),
copied with a header line that makes each copy a new document until the size is reached, written as
.jsonl.zst. It is built once per size under --workdir and reused. Code is the case the layout option is
for, so the stages run with data.keep_layout and whitespace-only pieces (BPE, vocab 8192, coverage 0.9995).

With --ladder the rest of the pipeline runs after them on the same corpus: train, evaluate and promote of
the tiny rung, then of the mini grown from it (--steps N training steps each, one val pass at the end; 0:
the rungs' own budgets and evaluations), each stage script alone: its wall time and peak RSS, and
evaluate's tokens/s beside its rung's training tokens/s from the same run (metrics/speed/). No stage after the tokenizer may grow with the train split.

Peak RSS is the stage's whole process tree (the stage and its cleaning workers, summed), sampled every
0.1 s. Targets on a 2-core machine: under 1.5 GB at every size; each stage at >= 80 % of the limit; MB/s
flat across sizes (cost linear in size).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mmrec.data.tokenizer import encode_split, layout_kept, load_tokenizer, read_docs, token_dtype  # noqa: E402

LIMIT_BYTES = 32 << 20  # train text the limit is measured on (all of it when smaller)


def python_sources() -> list[Path]:
    """Every .py file of this installation, in a fixed order."""
    roots = {Path(sysconfig.get_paths()[key]) for key in ("stdlib", "purelib", "platlib")}
    files = {p for root in roots for p in root.rglob("*.py") if p.is_file()}
    return sorted(files)


def generate(path: Path, size: int) -> None:
    """`size` bytes of text as .jsonl.zst: the installation's Python files, copy after copy."""
    sources = python_sources()
    written, copy = 0, 0
    tmp = path.with_name(path.name + ".part")
    with pa.CompressedOutputStream(str(tmp), "zstd") as out:
        while written < size:
            for source in sources:
                try:
                    text = source.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                text = f"# copy {copy} of {source.name}\n{text}"
                out.write((json.dumps({"text": text}) + "\n").encode())
                written += len(text.encode())
                if written >= size:
                    break
            copy += 1
    tmp.rename(path)


class PeakRss:
    """The largest summed RSS of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, every_s: float = 0.1):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(pid, every_s), daemon=True)
        self._thread.start()

    def _sample(self, pid: int, every_s: float) -> None:
        try:
            root = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            total = 0
            try:
                for proc in [root, *root.children(recursive=True)]:
                    try:
                        total += proc.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                return
            self.peak = max(self.peak, total)
            self._stop.wait(every_s)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def run_stage(project: Path, stage: str, *args: str) -> tuple[float, float]:
    """Run stages/<stage>.py in `project`: (wall seconds, peak RSS MB of its process tree)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "stages" / f"{stage}.py"), *args], cwd=project,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rss = PeakRss(proc.pid)
    out, _ = proc.communicate()
    seconds, peak = time.perf_counter() - start, rss.stop()
    if proc.returncode:
        sys.exit(f"{stage} {' '.join(args)} failed:\n{out}")
    return seconds, peak


def encode_limit(project: Path, threads: int, reps: int = 3) -> dict:
    """SentencePiece's own encode speed on the start of the prepared train text (LIMIT_BYTES), all in memory,
    one call with `threads` threads: what an encode pass would reach with no overhead at all. On a shared
    machine the speed drifts, so it is measured in turns with the stage's own encode code
    (mmrec.data.tokenizer.encode_split, reading the same text from a file), and both keep their best."""
    train = project / "data/prepared/train.txt"
    with open(train, "rb") as f:
        head = f.read(LIMIT_BYTES)
    sample = project / "limit.txt"
    sample.write_bytes(head[: head.rfind(b"\n") + 1])
    escaped = layout_kept(project / "data/prepared")
    docs = list(read_docs(sample, escaped))
    size = sum(len(d.encode()) for d in docs)
    sp = load_tokenizer(project / "models/tokenizer")
    dtype = token_dtype(sp.get_piece_size())
    limit = ours = 0.0
    for _ in range(reps):
        start = time.perf_counter()
        sp.encode(docs, return_type="numpy", num_threads=threads)
        limit = max(limit, size / 1e6 / (time.perf_counter() - start))
        start = time.perf_counter()
        encode_split(sp, sample, project / "limit.bin", threads, hashlib.sha256(), escaped, dtype, lambda n: None)
        ours = max(ours, size / 1e6 / (time.perf_counter() - start))
    return dict(limit=limit, ours=ours, mb=size / 1e6, threads=threads)


SWEEP_SCRIPT = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from mmrec.config import TokenizerParams
from mmrec.memory import peak_rss_mb
from mmrec.data.tokenizer import layout_kept, load_tokenizer, read_docs, train_tokenizer
params = TokenizerParams(**json.loads(sys.argv[3]))
prepared = Path(sys.argv[2]) / "data/prepared"
start = time.perf_counter()
model = train_tokenizer(prepared / "train.txt", Path(sys.argv[4]), params, seed=1337)
seconds, rss = time.perf_counter() - start, peak_rss_mb()
val = list(read_docs(prepared / "val.txt", layout_kept(prepared)))
tokens = sum(map(len, load_tokenizer(model).encode(val, num_threads=2)))
print(json.dumps({"seconds": seconds, "rss_mb": rss, "bytes_per_token": sum(len(d.encode()) for d in val) / tokens}))
"""


def sample_sweep(project: Path, sizes_mb: list[float], model_type: str, vocab_size: int, spaces: bool) -> None:
    """Train the tokenizer alone on samples of the prepared train split: seconds, peak RSS and bytes per
    token on the val split, by sample size."""
    print(f"\n| tokenizer sample | {model_type}: train s | peak RSS MB | val bytes/token |\n|---:|---:|---:|---:|")
    for mb in sizes_mb:
        params = dict(model_type=model_type, vocab_size=vocab_size, character_coverage=0.9995,
                      allow_whitespace_only_pieces=spaces, sample_bytes=int(mb * 1e6))
        done = subprocess.run([sys.executable, "-c", SWEEP_SCRIPT, str(ROOT), str(project), json.dumps(params),
                               str(project / "sweep-model")], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"tokenizer training failed:\n{done.stderr}")
        got = json.loads(done.stdout.splitlines()[-1])
        print(f"| {mb:g} MB | {got['seconds']:.1f} | {got['rss_mb']:.0f} | {got['bytes_per_token']:.2f} |")
        sys.stdout.flush()


def write_params(project: Path, source: Path, args: argparse.Namespace) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"] |= {"source": str(source), "group_by": args.group_by, "keep_layout": args.layout == "keep"}
    params["tokenizer"] |= {"vocab_size": args.vocab_size, "character_coverage": 0.9995,
                            "allow_whitespace_only_pieces": args.whitespace_pieces}
    if args.ladder:
        if args.steps:
            for rung in params["ladder"].values():
                rung["max_steps"] = args.steps
            params["train"]["eval_every"] = args.steps
        params["train"]["checkpoint_dir"] = str(project / "checkpoints")
        params["evaluate"] |= {"max_tokens": args.eval_tokens, "prompts": ["def ", "import "]}
        params["promote"]["on_reject"] = "continue"  # the bench wants every stage's figures, not the gate's verdict
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def ladder(project: Path) -> list[dict]:
    """Train, evaluate and promote each rung in order, the stage scripts alone: wall s and peak RSS of each,
    and evaluate's test tokens/s (and model tokens/s) beside the rung's training tokens/s."""
    rows = []
    rungs = list(yaml.safe_load((project / "params.yaml").read_text())["ladder"])
    for rung in rungs:
        for stage in ("train", "evaluate", "promote"):
            seconds, rss = run_stage(project, stage, rung)
            row = dict(stage=f"{stage}@{rung}", seconds=seconds, rss_mb=rss)
            if stage == "train":
                row["tokens_per_s"] = json.loads((project / f"metrics/speed/{rung}.json").read_text())["tokens_per_s"]
            if stage == "evaluate":
                speed = json.loads((project / f"metrics/speed/eval/{rung}.json").read_text())
                row |= {"tokens_per_s": speed["tokens_per_s"], "model_tokens_per_s": speed["model_tokens_per_s"],
                        "train_tokens_per_s": rows[-1]["tokens_per_s"],
                        "bpb": json.loads((project / f"metrics/eval/{rung}.json").read_text())["test_bpb_context"]}
            rows.append(row)
    return rows


def print_ladder(name: str, rows: list[dict]) -> None:
    print(f"\n| corpus | stage | wall s | peak RSS MB | tokens/s | evaluate: model tokens/s vs training's |"
          f"\n|---|---|---:|---:|---:|---:|")
    for row in rows:
        rate = f"{row['tokens_per_s']:,.0f}" if "tokens_per_s" in row else ""
        ratio = (f"{row['model_tokens_per_s']:,.0f} = {row['model_tokens_per_s'] / row['train_tokens_per_s']:.2f}x"
                 f" (bpb {row['bpb']:.3f})" if "model_tokens_per_s" in row else "")
        print(f"| {name} | {row['stage']} | {row['seconds']:.1f} | {row['rss_mb']:.0f} | {rate} | {ratio} |")
    sys.stdout.flush()


def bench(source: Path, project: Path, args: argparse.Namespace) -> tuple[list[dict], dict, list[dict]]:
    """The data stages' rows, the paired encode limit, and the ladder's rows (none without --ladder)."""
    project.mkdir(parents=True, exist_ok=True)
    write_params(project, source, args)
    rows = []
    for stage in ("download", "tokenizer"):
        seconds, rss = run_stage(project, stage)
        speed = json.loads((project / "metrics/speed" / f"{stage}.json").read_text())
        rows.append(dict(stage=stage, seconds=seconds, mb=speed["bytes"] / 1e6, rss_mb=rss, speed=speed))
    limit = encode_limit(project, rows[1]["speed"]["encode_threads"])
    return rows, limit, ladder(project) if args.ladder else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.1,1", help="GB of text to generate, comma-separated")
    parser.add_argument("--source", type=Path, help="bench this corpus instead of generated ones")
    parser.add_argument("--group-by", type=lambda s: [f for f in s.split(",") if f], default=[],
                        help="data.group_by for --source (comma-separated)")
    parser.add_argument("--layout", choices=["keep", "collapse"], default="keep", help="data.keep_layout")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--whitespace-pieces", action=argparse.BooleanOptionalAction, default=None,
                        help="tokenizer.allow_whitespace_only_pieces (default: on when the layout is kept)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mmrec-bench-data"))
    parser.add_argument("--sample-sweep", type=lambda s: [float(x) for x in s.split(",")],
                        help="then train the tokenizer alone on samples of these MB (of the first corpus's train "
                             "split): seconds and peak RSS, to choose tokenizer.sample_bytes")
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="for --sample-sweep")
    parser.add_argument("--ladder", action="store_true", help="then train, evaluate and promote tiny and mini")
    parser.add_argument("--steps", type=int, default=60, help="training steps of each rung for --ladder (0: its own)")
    parser.add_argument("--eval-tokens", type=int, default=0, help="evaluate.max_tokens for --ladder (0: all)")
    parser.add_argument("--sweep-only", action="store_true", help="skip the stages: sweep a corpus prepared before")
    args = parser.parse_args()
    if args.whitespace_pieces is None:
        args.whitespace_pieces = args.layout == "keep"

    print(f"machine: {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
          f"load average at start {os.getloadavg()[0]:.2f}")
    cases = [(args.source.name, args.source.resolve())] if args.source else []
    for size in ([] if args.source else args.sizes.split(",")):
        corpus = args.workdir / f"code-{size}GB.jsonl.zst"
        if not corpus.exists():
            args.workdir.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            generate(corpus, int(float(size) * 1e9))
            print(f"generated {corpus} ({corpus.stat().st_size / 1e9:.2f} GB compressed) "
                  f"in {time.perf_counter() - start:.0f}s")
        cases.append((f"{size} GB", corpus))

    projects = [args.workdir / f"project-{name.replace(' ', '')}" for name, _ in cases]
    if args.sweep_only:
        sample_sweep(projects[0], args.sample_sweep or [32], args.model_type, args.vocab_size,
                     args.whitespace_pieces)
        return
    ladders = []
    print("\n| corpus | stage | wall s | text MB | MB/s | peak RSS MB | vs limit |\n|---|---|---:|---:|---:|---:|---:|")
    for (name, source), project in zip(cases, projects):
        rows, paired, ladder_rows = bench(source, project, args)
        limit = paired["limit"]
        for row in rows:
            rate = row["mb"] / row["seconds"]
            print(f"| {name} | {row['stage']} | {row['seconds']:.1f} | {row['mb']:.0f} | {rate:.2f} | "
                  f"{row['rss_mb']:.0f} | {rate / limit:.0%} |")
        tok = rows[1]["speed"]
        print(f"| {name} | tokenizer: train on the sample | {tok['train_seconds']:.1f} | | | | |")
        print(f"| {name} | tokenizer: encode pass | {tok['encode_seconds']:.1f} | {tok['bytes'] / 1e6:.0f} | "
              f"{tok['encode_mb_per_s']:.2f} | | {tok['encode_mb_per_s'] / limit:.0%} |")
        print(f"| {name} | limit: spm.encode, {paired['threads']} threads, {paired['mb']:.0f} MB in memory | "
              f"| {paired['mb']:.0f} | {limit:.2f} | | 100% |")
        print(f"| {name} | the stage's encode code on the same {paired['mb']:.0f} MB, in turns with the limit | "
              f"| {paired['mb']:.0f} | {paired['ours']:.2f} | | {paired['ours'] / limit:.0%} |")
        sys.stdout.flush()
        ladders.append((name, ladder_rows))
    for name, rows in ladders:
        print_ladder(name, rows)
    if args.sample_sweep:
        sample_sweep(projects[0], args.sample_sweep, args.model_type, args.vocab_size, args.whitespace_pieces)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
