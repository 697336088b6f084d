"""`python -m mmrec.registry export`: a version or a checkpoint as safetensors, config, tokenizer and model card, which
load_model reads back into the very same function."""
import json
import struct

import pytest
import torch

from mmrec.model.inference import load_model
from mmrec.registry.models import main as registry_cli
from tests.conftest import tiny_params

FILES = {"model.safetensors", "config.json", "tokenizer.model", "README.md"}


def cli(params, *args: str) -> None:
    registry_cli(["--tracking-uri", params.mlflow.tracking_uri, "--model", "mmrec", "export", *args])


def error_line(capsys, params, *args: str) -> str:
    with pytest.raises(SystemExit) as stop:
        cli(params, *args)
    assert stop.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    return line


def same_logits(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randint(0, a.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a(x).logits, b(x).logits)


def safetensors_header(path) -> dict:
    """The JSON header that opens a safetensors file: tensor names, dtypes, shapes and offsets, nothing else."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size])


def test_the_champion_exports_and_loads_back_with_identical_logits(workdir, tmp_path, capsys):
    from mmrec.registry.gate import promote_rung
    from tests.registry.test_gate import rung_with_checkpoint

    params = tiny_params(workdir)
    paths = rung_with_checkpoint(workdir, params, "tiny", 1.5)
    promote_rung(params, "tiny", workdir)
    capsys.readouterr()
    out = tmp_path / "export"
    cli(params, "champion", str(out))
    assert capsys.readouterr().out.startswith(f"exported mmrec v1 to {out}")
    assert {p.name for p in out.iterdir()} == FILES
    model, config = load_model(out)
    original, ckpt = load_model(paths.best)
    assert same_logits(model, original) and config["config"] == ckpt["config"]
    header = safetensors_header(out / "model.safetensors")
    assert header["__metadata__"] == {"wte.weight": "head.weight"}  # tied: stored once, the other name an alias
    assert "wte.weight" not in header and header["head.weight"]["dtype"] == "F32"
    assert (out / "tokenizer.model").read_bytes() == paths.tokenizer.read_bytes()
    card = (out / "README.md").read_text()
    assert "| test bits per byte, full context (the gate's figure) | 1.5000 |" in card
    assert "| unigram baseline, bits per byte | 2.2000 |" in card and "## Intended use and limits" in card
    assert "| version | 1 |" in card and "| aliases | champion, tiny |" in card
    assert config["source"] == {"registered_model": "mmrec", "version": "1", "aliases": ["champion", "tiny"]}

    cli(params, "1", str(out))  # by number, over the earlier export
    assert same_logits(load_model(out)[0], original)
    capsys.readouterr()
    assert error_line(capsys, params, "nope", str(tmp_path / "x")) == ("error: mmrec has no alias 'nope'; it has: "
                                                                      "champion, tiny (or give a version number, an "
                                                                      "alias or a checkpoint file)")
    assert error_line(capsys, params, "9", str(tmp_path / "x")).startswith("error: mmrec has no version '9'; it has: 1")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("arch", ["mmrec", "gpt"])
def test_a_checkpoint_file_exports_with_its_figures_and_a_bad_folder_is_one_line(workdir, tmp_path, capsys, arch):
    from mmrec.data.tokenizer import read_header
    from mmrec.model.checkpoint import save_atomic
    from mmrec.model.lm import ModelConfig, build_model
    from mmrec.paths import RungPaths

    params = tiny_params(tmp_path, model={"arch": arch})
    paths = RungPaths(workdir, "tiny")
    header = read_header(paths.tokens)
    cfg = ModelConfig.from_params(params.model, params.rung("tiny"), header["vocab_size"], params.train.seq_len)
    torch.manual_seed(1)
    inputs = {"params": {"seed": 1, "model": params.model.model_dump(), "train": params.train.model_dump(),
                         "rung": params.rung("tiny").model_dump()}, "data": "d" * 64}
    save_atomic({"model": build_model(cfg).state_dict(), "config": cfg.to_dict(), "rung": "tiny",
                 "progress": {"step": 40, "tokens": 10240, "best_val": 1.2345}, "fingerprint_inputs": inputs,
                 "tokenizer_sha256": header["tokenizer_sha256"]}, paths.best)
    paths.eval_metrics.parent.mkdir(parents=True, exist_ok=True)
    paths.eval_metrics.write_text(json.dumps({"test_bpb_context": 0.8765, "test_bpb": 0.9, "unigram_bpb": 2.1,
                                              "test_documents": 11}))
    out = tmp_path / "from-file"
    cli(params, str(paths.best), str(out))
    model, config = load_model(out)
    assert same_logits(model, load_model(paths.best)[0]) and config["rung"] == "tiny"
    card = (out / "README.md").read_text()
    assert "| test bits per byte, full context (the gate's figure) | 0.8765 |" in card
    assert "| best validation loss (nats / token) | 1.2345 |" in card and "| test documents | 11 |" in card
    assert "| steps, tokens trained | 40, 10,240 |" in card
    assert len({(out / f).stat().st_mode for f in FILES}) == 1  # the weights as readable as the rest
    assert f"| token files sha256 (data_sha256) | {'d' * 64} |" in card
    assert "| train.lr | 0.01 |" in card and "train.threads" not in card

    (tmp_path / "a-file").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/notes.txt").write_text("mine")
    capsys.readouterr()
    assert error_line(capsys, params, str(paths.best), str(tmp_path / "a-file")) == \
        f"error: export folder {tmp_path / 'a-file'} is a file; name a new folder"
    assert error_line(capsys, params, str(paths.best), str(tmp_path / "busy")).startswith(
        f"error: export folder {tmp_path / 'busy'} holds other files")
    assert error_line(capsys, params, str(paths.best), str(tmp_path / "a-file/sub")).startswith(
        f"error: cannot write export folder {tmp_path / 'a-file/sub'}")
    assert error_line(capsys, params, str(tmp_path / "none.pt"), str(tmp_path / "y")).startswith(
        f"error: checkpoint {tmp_path / 'none.pt'} not found")
    assert (tmp_path / "busy/notes.txt").read_text() == "mine" and not (tmp_path / "y").exists()
