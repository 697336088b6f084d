"""Where every file of the pipeline lives, relative to the repository root: the one place for these names."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")
DATA, MODELS = Path("data"), Path("models")  # every stage's outputs live under these and METRICS (and checkpoints/)
PARAMS_OK = Path("data/params.ok")  # written by the validate stage; every stage depends on it
# Each stage's marker while it runs (mmrec/attempts.py); the validate stage depends on the folder, so that a stage
# killed since the last `dvc repro` makes the next one clean up after it. Committed with a .gitignore of its own.
ATTEMPTS = Path("attempts")
RAW = Path("data/raw")
PREPARED = Path("data/prepared")
TOKENS = Path("data/tokens")
TOKENIZER = Path("models/tokenizer")
METRICS = Path("metrics")
REPORTS = Path("reports")  # the report stage's page and its pictures (pipeline/report.py)
REPORT = REPORTS / "report.md"
# what the data stages measured: counts (reproducible, DVC outputs) and wall clock (metrics/speed/, never metrics)
DOWNLOAD_METRICS, DOWNLOAD_SPEED = METRICS / "download.json", METRICS / "speed" / "download.json"
TOKENIZER_METRICS, TOKENIZER_SPEED = METRICS / "tokenizer.json", METRICS / "speed" / "tokenizer.json"
# The gate's figure, its key in metrics/eval/<rung>.json: test bits per byte with the full context each arch
# can use (pipeline/evaluate.py). MLflow shows it as test/bpb_context (tracking/run.py: test_metric_names).
GATE_METRIC = "test_bpb_context"
EVAL_ARTIFACTS = "eval"  # the folder of a rung run's MLflow artifacts that evaluate logs its score files in


def test_metric_name(key: str) -> str:
    """One of evaluate's figures under its MLflow name: test_bpb -> test/bpb, unigram_bpb -> test/unigram_bpb, so
    MLflow charts them in one 'test' section (runs and logged models alike)."""
    return f"test/{key.removeprefix('test_')}"


GATE_METRIC_NAME = test_metric_name(GATE_METRIC)
# Registry aliases (mmrec/registry/gate.py): `champion` on the best version, `exp-<name>` on a dvc experiment's,
# and each rung's name on its best version (so no rung may take a name of these, nor one MLflow reserves).
CHAMPION = "champion"
EXPERIMENT_ALIAS = "exp-"
OUTPUT_ROOTS = (DATA, MODELS, METRICS, REPORTS)  # the folders DVC writes (and deletes) outputs in
# What the stages that run once per pipeline write, as their outs in dvc.yaml (tests/base/test_config.py checks
# the two agree): a rung's files must never land on these (see `taken_by`).
SHARED_OUTS = (PARAMS_OK, PREPARED, DOWNLOAD_METRICS, DOWNLOAD_SPEED, TOKENIZER, TOKENS, TOKENIZER_METRICS,
               TOKENIZER_SPEED, REPORTS)


@dataclass
class RungPaths:
    """One rung's files under `root`."""
    root: Path
    rung: str
    checkpoint_dir: str = "checkpoints"
    training: str = ""  # the training's own folder in checkpoint_dir, when not <rung> (pipeline/checkpoint_dirs.py)

    @property
    def outs(self) -> tuple[Path, ...]:
        """Every path this rung's stages write (its model folder holds the rest), and its checkpoints."""
        return (self.model(), self.ckpt, self.metrics, self.eval_metrics, self.doc_scores, self.speed,
                self.eval_speed, self.train_curve, self.val_curve, self.plot, self.summary)

    def model(self, rung: str | None = None) -> Path:
        return self.root / "models" / (rung or self.rung)

    @property
    def ckpt(self) -> Path:
        return self.root / self.checkpoint_dir / (self.training or self.rung)

    @property
    def best(self) -> Path:
        return self.model() / "best.pt"

    @property
    def run_file(self) -> Path:
        return self.model() / "run.json"

    @property
    def promotion(self) -> Path:
        return self.model() / "promotion.json"

    def handoff(self, rung: str | None = None) -> Path:
        """What a child rung depends on: the rung's checkpoint digest and verdict, nothing that a threshold changes."""
        return self.model(rung) / "handoff.json"

    def _metrics_file(self, kind: str, suffix: str = ".json") -> Path:
        """metrics/<kind>/<rung><suffix>: each kind of figure in its own folder, one file per rung."""
        return self.root / METRICS / kind / f"{self.rung}{suffix}"

    @property
    def metrics(self) -> Path:
        return self._metrics_file("train")

    @property
    def eval_metrics(self) -> Path:
        return self._metrics_file("eval")

    @property
    def doc_scores(self) -> Path:
        """The gate's figure document by document: id, scored bytes and bits of each test document."""
        return self._metrics_file("eval", ".docs.json")

    @property
    def doc_scores_artifact(self) -> str:
        """Where evaluate logs doc_scores among the rung run's MLflow artifacts (compare reads them there)."""
        return f"{EVAL_ARTIFACTS}/{self.doc_scores.name}"

    @property
    def speed(self) -> Path:
        """Training's wall-clock figures (tokens/s, MFU)."""
        return self._metrics_file("speed")

    @property
    def eval_speed(self) -> Path:
        """Evaluate's: seconds, test tokens/s, threads, peak RSS (beside training's, to compare)."""
        return self._metrics_file("speed/eval")

    @property
    def train_curve(self) -> Path:
        """step, train loss and lr at every step (a DVC plot)."""
        return self._metrics_file("curves/train", ".csv")

    @property
    def val_curve(self) -> Path:
        """step and val loss at each evaluation (a DVC plot)."""
        return self._metrics_file("curves/val", ".csv")

    @property
    def plot(self) -> Path:
        """Both curves in one PNG: a DVC plot that renders offline, and the run's MLflow artifact."""
        return self._metrics_file("plots", ".png")

    @property
    def summary(self) -> Path:
        """The rung's headline, the one DVC metrics file (short keys for `dvc exp show`)."""
        return self._metrics_file("summary")

    @property
    def tokens(self) -> Path:
        return self.root / TOKENS

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / TOKENIZER

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER / "spm.model"


def taken_by(rung: str, checkpoint_dir: str = "checkpoints") -> tuple[Path, Path] | None:
    """(the rung's path, the shared output it would overwrite or write into), or None when a rung may take
    this name: `tokenizer` would put its model beside spm.model, `download` its timing over the corpus's."""
    for mine in RungPaths(Path(), rung, checkpoint_dir).outs:
        for theirs in SHARED_OUTS:
            if mine == theirs or theirs in mine.parents or mine in theirs.parents:
                return mine, theirs
    return None
