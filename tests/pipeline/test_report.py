"""The report stage's page: every number it shows is the one in the file it comes from."""
import json
import lzma
from pathlib import Path

import pytest

from mmrec.pipeline.report import compressor_baselines, write_report
from tests.conftest import synthetic_documents, tiny_params

SPLIT_DOCS = {"train": synthetic_documents(60, seed=1), "val": synthetic_documents(5, seed=2),
              "test": synthetic_documents(8, seed=3)}


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)


def figures(root: Path) -> dict:
    """The files of a trained two-rung ladder, with figures no formatter could guess."""
    for split, docs in SPLIT_DOCS.items():
        write(root / f"data/prepared/{split}.txt", "".join(d + "\n" for d in docs))
    f = {"download": {"duplicates": 3, "short": 2, **{s: {"documents": 100 + i, "bytes": 123457 + i,
                                                          "characters": 123001 + i} for i, s in enumerate(SPLIT_DOCS)}},
         "tokenizer": {"vocab_size": 4321, **{s: {"tokens": 45678 + i, "bytes": 98765 + i,
                                                  "bytes_per_token": 2.16227 + i, "byte_fallback_rate": 0.00123 + i,
                                                  "characters": 1, "documents": 1, "unk_rate": 0.0}
                                              for i, s in enumerate(SPLIT_DOCS)}}}
    write(root / "metrics/download.json", f["download"])
    write(root / "metrics/tokenizer.json", f["tokenizer"])
    for i, rung in enumerate(["tiny", "mini"]):
        f[rung] = {"train": {"best_val_loss": 1.23456 - i, "best_step": 30 + i * 100, "steps": 40 + 300 * i,
                             "final_train_loss": 1.0, "final_val_loss": 1.3, "n_params": 25730 + 1000000 * i,
                             "tokens_seen": (40 + 300 * i) * 256, "stopped_early": False},
                   "speed": {"tokens_per_s": 29105.4 - i * 1000, "mfu": 0.069512 + i / 10, "seconds": 12.345 + 100 * i},
                   "eval_speed": {"seconds": 3.456 + 10 * i, "model_tokens_per_s": 78583.1 - i * 3000},
                   "eval": {"test_bpb": 0.84081 - i / 2, "test_bpb_context": 0.89196 - i / 2, "test_documents": 11 + i,
                            "unigram_bpb": 2.11886},
                   "promotion": {"promoted": True, "champion": i == 1, "model_version": str(i + 1),
                                 "gain": 1.22691 if i == 0 else 0.54598, "gain_low": None if i == 0 else 0.51267,
                                 "gain_high": None if i == 0 else 0.58223,
                                 "compared_to": "unigram" if i == 0 else "tiny",
                                 "reason": f"reason of {rung}"}}
        write(root / f"metrics/train/{rung}.json", f[rung]["train"])
        write(root / f"metrics/speed/{rung}.json", f[rung]["speed"])
        write(root / f"metrics/eval/{rung}.json", f[rung]["eval"])
        write(root / f"metrics/speed/eval/{rung}.json", f[rung]["eval_speed"])
        write(root / f"models/{rung}/promotion.json", f[rung]["promotion"])
        write(root / f"metrics/curves/train/{rung}.csv", "step,train_loss,lr\n" + "".join(
            f"{s},{3 - s / 400},0.01\n" for s in range(1, f[rung]["train"]["steps"] + 1)))
        write(root / f"metrics/curves/val/{rung}.csv", "step,val_loss\n" + "".join(
            f"{s},{3 - s / 300}\n" for s in range(20, f[rung]["train"]["steps"] + 1, 20)))
    return f


def tables(page: str) -> dict[str, list[dict[str, str]]]:
    """Each markdown table of the page under its section heading, as rows keyed by column."""
    out, heading, rows = {}, "", []
    for line in page.splitlines() + [""]:
        if line.startswith("## "):
            heading = line[3:]
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            out[heading] = [dict(zip(rows[0], r)) for r in rows[2:]]
            rows = []
    return out


def number(cell: str) -> float:
    return float(cell.replace(",", "").removesuffix(" %").removesuffix(" s"))


def test_every_number_of_the_report_is_the_one_in_its_file(tmp_path):
    root = tmp_path
    f = figures(root)
    page = write_report(tiny_params(root), root, log=False).read_text()
    t = tables(page)
    for row in t["Rungs: training"]:
        rung = f[row["rung"]]
        assert number(row["params"]) == rung["train"]["n_params"] and number(row["steps"]) == rung["train"]["steps"]
        assert number(row["tokens"]) == rung["train"]["tokens_seen"]
        assert number(row["wall time"]) == pytest.approx(rung["speed"]["seconds"], abs=0.05)
        assert number(row["tokens/s"]) == round(rung["speed"]["tokens_per_s"])
        assert number(row["MFU"]) == pytest.approx(100 * rung["speed"]["mfu"], abs=0.005)
        assert number(row["best val loss"]) == pytest.approx(rung["train"]["best_val_loss"], abs=5e-5)
    assert [r["grown from"] for r in t["Rungs: training"]] == ["-", "tiny"]
    for row in t["Rungs: test and gate"]:
        rung = f[row["rung"]]
        assert number(row["test bpb, full context"]) == pytest.approx(rung["eval"]["test_bpb_context"], abs=5e-5)
        assert number(row["test bpb, windows"]) == pytest.approx(rung["eval"]["test_bpb"], abs=5e-5)
        assert number(row["test documents"]) == rung["eval"]["test_documents"]
        seconds, times = row["evaluate"].split(" s (")
        assert number(seconds) == pytest.approx(rung["eval_speed"]["seconds"], abs=0.05)
        assert float(times.removesuffix("x)")) == pytest.approx(
            rung["eval_speed"]["model_tokens_per_s"] / rung["speed"]["tokens_per_s"], abs=0.05)
        assert number(row["gain [interval]"].split()[0]) == pytest.approx(rung["promotion"]["gain"], abs=5e-5)
        assert row["over"] == rung["promotion"]["compared_to"]
    assert [r["gain [interval]"].split()[1] for r in t["Rungs: test and gate"]] == ["-", "[0.5127,0.5822]"]
    assert [r["decision"] for r in t["Rungs: test and gate"]] == ["promoted v1", "promoted v2 (champion)"]
    assert "- mini: reason of mini" in page and "`champion` is v2 (mini)" in page

    for row in t["Corpus"]:
        split = f["download"][row["split"]]
        assert [number(row[k]) for k in ("documents", "bytes", "characters")] == [
            split["documents"], split["bytes"], split["characters"]]
    assert "3 duplicate and 2 too-short" in page
    assert "Vocabulary 4,321 pieces" in page
    for row in t["Tokenizer"]:
        split = f["tokenizer"][row["split"]]
        assert number(row["tokens"]) == split["tokens"] and number(row["bytes"]) == split["bytes"]
        assert number(row["bytes per token"]) == pytest.approx(split["bytes_per_token"], abs=5e-5)
        assert number(row["byte fallback rate"]) == pytest.approx(split["byte_fallback_rate"], abs=5e-5)

    # the baselines: unigram from evaluate, each compressor recomputed here from the split files
    base = {r["baseline"]: number(r["bits per test byte"]) for r in t["Baselines on the same test text"]}
    assert base["unigram"] == pytest.approx(f["tiny"]["eval"]["unigram_bpb"], abs=5e-5)
    train, test = ((root / f"data/prepared/{s}.txt").read_bytes() for s in ("train", "test"))
    xz_bits = 8 * (len(lzma.compress(train + test, preset=9)) - len(lzma.compress(train, preset=9)))
    assert base["xz -9"] == pytest.approx(xz_bits / (len(test) - test.count(b"\n")), abs=5e-5)
    assert 0 < base["xz -9"] < 8 and 0 < base["zstd -19"] < 8
    assert all(f"| {key} | " in page.split("## Environment")[1] for key in ("CPU", "cores", "torch", "git commit"))
    for picture in ("loss_curves.png", "test_bpb.png"):
        assert f"]({picture})" in page and (root / "reports" / picture).read_bytes()[:4] == b"\x89PNG"


def test_the_compressors_see_a_bounded_context_of_whole_documents(tmp_path):
    lines = [f"document {i} " + "x" * (i % 50) + "\n" for i in range(2000)]
    write(tmp_path / "train.txt", "".join(lines))
    write(tmp_path / "test.txt", "".join(lines[-30:]))  # text the context holds: it costs next to nothing
    b = compressor_baselines(tmp_path, context_bytes=5000, test_bytes=400)
    assert 4900 < b["context_bytes"] <= 5000 and b["train_bytes"] > 50_000
    head = "".join(lines[-30:])[:400]
    whole_lines = head[:head.rfind("\n") + 1]
    assert not b["whole_test"] and b["test_documents"] == head.count("\n")
    assert b["test_bytes"] == len(whole_lines) - whole_lines.count("\n")
    assert b["bpb"]["xz -9"] < 1 and b["bpb"]["zstd -19"] < 1


def test_the_report_renders_in_the_pipeline_runs_artifact_view(tmp_path, monkeypatch):
    """The page and its pictures are artifacts of the pipeline's parent run, the page's pictures at the server's
    get-artifact route (the artifact view renders only absolute image URLs); a parent this stage opened (no rung
    ran) ends FINISHED."""
    from mlflow import MlflowClient

    figures(tmp_path)
    monkeypatch.chdir(tmp_path)
    params = tiny_params(tmp_path)
    write_report(params, tmp_path)
    c = MlflowClient(params.mlflow.tracking_uri)
    [run] = c.search_runs([c.get_experiment_by_name(params.mlflow.experiment).experiment_id])
    assert run.data.tags["kind"] == "pipeline" and run.info.status == "FINISHED"
    assert {a.path for a in c.list_artifacts(run.info.run_id, "report")} == {
        "report/report.md", "report/loss_curves.png", "report/test_bpb.png"}
    logged = Path(c.download_artifacts(run.info.run_id, "report/report.md", str(tmp_path / "dl"))).read_text()
    page = (tmp_path / "reports/report.md").read_text()
    for picture in ("loss_curves.png", "test_bpb.png"):
        route = f"get-artifact?path=report%2F{picture}&run_uuid={run.info.run_id}"
        served = f"](http://127.0.0.1:5000/{route})\n\n[{picture}]({route})"  # a local store: `mlflow ui`'s address
        assert served in logged and f"]({picture})" not in logged
        logged = logged.replace(served, f"]({picture})")
    assert logged == page
