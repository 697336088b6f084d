"""The one typed schema for params.yaml.

Every stage calls `load_params()` first: an unknown key, a wrong type or an out-of-range value
becomes one `ParamsError` line naming the dotted key, the bad value and what is allowed, before
any work starts. Nothing else in the project reads params.yaml.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from mmrec.errors import UserError
from mmrec.paths import ATTEMPTS, CHAMPION, EXPERIMENT_ALIAS, OUTPUT_ROOTS, taken_by
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

PARAMS_FILE = Path("params.yaml")
RUNG_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


class ParamsError(UserError):
    """A user mistake in params.yaml; its message is one line, fit to print as is."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


PositiveInt = Annotated[int, Field(gt=0)]
GROWTH_SPLIT = 0.5  # spread of the uneven shares that break the symmetry of width growth (growth.py)
Fraction = Annotated[float, Field(gt=0, lt=0.5)]
MAX_VOCAB = 1 << 20  # SentencePiece pieces; ids above 65535 make the token files uint32


class DataParams(Section):
    source: str = "package:bible/data/kjv.jsonl"  # http(s)://... | a path | package:<import name>/<file>
    sha256: str = ""  # required for URLs: the download is verified against it
    text_field: str = "text"  # jsonl/parquet column that holds the text
    group_by: list[str] = ["book", "chapter"]  # jsonl/parquet: consecutive records sharing these form one document
    val_fraction: Fraction = 0.05
    test_fraction: Fraction = 0.05
    val_max_bytes: Annotated[int, Field(ge=0)] = 2_000_000  # 0: no cap; over it, the highest-hash val documents train
    test_max_bytes: Annotated[int, Field(ge=0)] = 2_000_000  # 0: no cap; the same rule for test
    min_doc_chars: Annotated[int, Field(ge=1)] = 1
    keep_layout: bool = False  # keep newlines and indentation (code, poetry); false: every whitespace run is one space
    max_documents: Annotated[int, Field(ge=0)] = 0  # read only the first N documents of the source; 0: all
    timeout_s: Annotated[float, Field(gt=0)] = 30.0
    retries: Annotated[int, Field(ge=0, le=20)] = 3
    max_bytes: PositiveInt = 2_000_000_000

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, v: str) -> str:
        if v and not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("must be empty or 64 lowercase hex digits")
        return v

    @model_validator(mode="after")
    def _splits_leave_train(self) -> "DataParams":
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% for train")
        return self


class TokenizerParams(Section):
    vocab_size: Annotated[int, Field(ge=100, le=MAX_VOCAB)] = 5000  # above 65536 the token files are uint32
    model_type: Literal["bpe", "unigram"] = "bpe"
    character_coverage: Annotated[float, Field(gt=0.9, le=1.0)] = 1.0
    byte_fallback: bool = True
    split_digits: bool = True
    allow_whitespace_only_pieces: bool = False  # pieces made of spaces only: indentation (with data.keep_layout)
    num_threads: Annotated[int, Field(ge=1, le=256)] = 2  # training threads: fixed so spm.model is identical on a rerun
    sample_bytes: PositiveInt = 32_000_000  # train text SentencePiece learns from (seeded sample): bounds its memory


class ModelParams(Section):
    arch: Literal["mmrec", "gpt"] = "mmrec"
    ffn: Literal["swiglu", "gelu"] = "swiglu"
    ffn_mult: Annotated[float, Field(gt=0, le=16)] = 2.75  # FFN hidden = ffn_mult * width (~8/3 for SwiGLU)
    dpg_rank: Annotated[int, Field(ge=1, le=1024)] = 16  # rank of the low-rank decay gate (DPG)
    chunk_size: Annotated[int, Field(ge=1, le=1024)] = 32  # scan chunk length C
    min_floor: Annotated[float, Field(gt=0, lt=1)] = 0.5  # smallest decay floor: bounds |log A| in a chunk
    max_floor: Annotated[float, Field(gt=0, lt=1)] = 0.996  # largest decay floor (longest memory)
    uboo_weight: Annotated[float, Field(ge=0)] = 0.0  # auxiliary next-state loss; 0 turns it off
    head_dim: Annotated[int, Field(ge=8, le=1024)] = 32  # gpt baseline: width / head_dim heads
    norm_eps: Annotated[float, Field(gt=0, lt=1e-2)] = 1e-6
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    tie_head: bool = True  # the output head is the embedding; false: its own matrix (zero at init, AdamW)

    @model_validator(mode="after")
    def _floors_ordered(self) -> "ModelParams":
        if self.min_floor > self.max_floor:
            raise ValueError("min_floor must not exceed max_floor")
        return self

    @model_validator(mode="after")
    def _gpt_can_be_built(self) -> "ModelParams":
        """What GPTBlock needs besides a width that head_dim divides (checked per rung, in the ladder)."""
        if self.arch == "gpt" and self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for arch 'gpt' (rotary positions turn "
                             "channels in pairs)")
        if self.arch == "gpt" and self.uboo_weight > 0:
            raise ValueError(f"uboo_weight {self.uboo_weight} needs arch 'mmrec' (UBOO predicts the recurrent "
                             "state); set it to 0 for 'gpt'")
        return self


class RungParams(Section):
    width: Annotated[int, Field(ge=8, le=8192)]
    layers: Annotated[int, Field(ge=1, le=128)]
    memories: Annotated[int, Field(ge=1, le=64)] = 4
    # What this rung waits for, as a DVC dependency path: `data/tokens` for a rung trained from
    # scratch, `models/<parent>/handoff.json` for a rung grown from <parent>. The handoff holds only the
    # parent's checkpoint digest and verdict, so a changed gate threshold never retrains the child.
    after: str = "data/tokens"
    max_steps: Annotated[int, Field(ge=0)] = 0  # 0: use train.max_steps
    lr: Annotated[float, Field(ge=0)] = 0.0  # 0: use train.lr
    dropout: Annotated[float | None, Field(ge=0, lt=1)] = None  # None: use model.dropout (a larger rung overfits sooner)
    ema_decay: Annotated[float | None, Field(ge=0, lt=1)] = None  # None: use train.ema_decay

    @property
    def parent(self) -> str | None:
        m = re.fullmatch(r"models/([^/]+)/handoff\.json", self.after)
        return m.group(1) if m else None

    @field_validator("after")
    @classmethod
    def _known_after(cls, v: str) -> str:
        if v != "data/tokens" and not re.fullmatch(r"models/[a-z][a-z0-9_-]*/handoff\.json", v):
            raise ValueError("must be 'data/tokens' or 'models/<rung>/handoff.json'")
        return v

    @model_validator(mode="after")
    def _width_splits(self) -> "RungParams":
        if self.width % self.memories:
            raise ValueError(f"width {self.width} must be a multiple of memories {self.memories}")
        return self


class TrainParams(Section):
    seq_len: Annotated[int, Field(ge=2, le=65536)] = 256
    batch_size: PositiveInt = 8
    grad_accum: PositiveInt = 1
    lr: Annotated[float, Field(gt=0, le=1)] = 5e-3
    min_lr: Annotated[float, Field(ge=0, le=1)] = 3e-4
    warmup_steps: Annotated[int, Field(ge=0)] = 50
    rewarmup_steps: Annotated[int, Field(ge=0)] = 20  # warmup of a rung grown from its parent
    growth_lr_scale: Annotated[float, Field(gt=0, le=1)] = 0.5  # a grown rung's peak lr: lr x this (unless ladder.<rung>.lr)
    growth_split: Annotated[float, Field(ge=0, le=2)] = GROWTH_SPLIT  # uneven shares of width copies; 0: even (symmetric)
    schedule: Literal["cosine", "wsd"] = "wsd"  # after warmup: cosine to min_lr, or warmup-stable-decay
    decay_fraction: Annotated[float, Field(gt=0, le=1)] = 0.2  # wsd: the last share of the steps, linear to min_lr
    optimizer: Literal["adamw", "muon"] = "muon"  # muon: Muon for the hidden matrices, AdamW for the rest (optim.py)
    muon_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.95
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.3
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    beta2: Annotated[float, Field(ge=0, lt=1)] = 0.99
    grad_clip: Annotated[float, Field(ge=0)] = 1.0  # 0 turns clipping off
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0  # evaluate and keep an EMA of the weights; 0: off
    max_steps: Annotated[int, Field(ge=1)] = 2500
    max_tokens: Annotated[int, Field(ge=0)] = 0  # 0: budget is max_steps only
    eval_every: PositiveInt = 100
    eval_windows: PositiveInt = 32  # fixed validation windows of seq_len tokens
    patience: Annotated[int, Field(ge=0)] = 0  # evaluations without improvement; 0 never stops early
    log_every: PositiveInt = 10
    recompute: bool = False  # keep only each block's input for backward and run the block again: less memory, same bits
    threads: Annotated[int, Field(ge=0, le=1024)] = 0  # 0: a fair share, cores / trainings running at once (mmrec/training/cores.py)
    nproc: Annotated[int, Field(ge=1, le=1024)] = 1  # data-parallel processes on each machine (torchrun)
    nnodes: Annotated[int, Field(ge=1, le=1024)] = 1  # machines that train together (docs/gpus.md)
    rdzv_endpoint: str = ""  # host:port where the nodes meet: the one that runs `dvc repro`
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: Literal["auto", True, False] = "auto"  # auto: torch.compile on CUDA, eager on the CPU
    checkpoint_dir: str = "checkpoints"  # last.pt lives here, outside DVC, so a killed run resumes

    @field_validator("checkpoint_dir")
    @classmethod
    def _outside_dvc_outputs(cls, v: str) -> str:
        # DVC deletes a stage's outputs before it runs and replaces them on a restore: a last.pt among them
        # would be gone just when a killed run needs it (a rung's model folder is models/<rung>)
        top = Path(v).parts[:1]
        if top and not Path(v).is_absolute() and Path(*top) in OUTPUT_ROOTS:
            roots = ", ".join(f"{r}/" for r in OUTPUT_ROOTS)
            raise ValueError(f"puts last.pt under {top[0]}/, where DVC keeps (and deletes) stage outputs; use a "
                             f"folder outside {roots} (default: checkpoints)")
        if top and not Path(v).is_absolute() and Path(*top) == ATTEMPTS:  # every save would rerun validate
            raise ValueError(f"puts last.pt under {top[0]}/, the stages' markers that the validate stage depends "
                             "on; use another folder (default: checkpoints)")
        return v

    @field_validator("rdzv_endpoint")
    @classmethod
    def _host_port(cls, v: str) -> str:
        m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(\d{1,5})", v)
        if v and not (m and 0 < int(m.group(2)) < 65536):
            raise ValueError("must be host:port, e.g. node0:29500")
        return v

    @model_validator(mode="after")
    def _nodes_can_meet(self) -> "TrainParams":
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"rdzv_endpoint is required when nnodes = {self.nnodes}: host:port of the node that "
                             "runs `dvc repro`, which every node reaches (e.g. node0:29500)")
        return self

    @model_validator(mode="after")
    def _min_below_lr(self) -> "TrainParams":
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} must not exceed lr {self.lr}")
        return self


class EvaluateParams(Section):
    batch_size: PositiveInt = 16
    max_tokens: Annotated[int, Field(ge=0)] = 0  # 0: every test token; else at least train.seq_len + 1
    prompts: list[str] = ["In the beginning", "And the LORD said unto Moses,"]
    sample_tokens: Annotated[int, Field(ge=1, le=4096)] = 60
    temperature: Annotated[float, Field(gt=0, le=10)] = 0.8
    top_k: Annotated[int, Field(ge=0)] = 50  # 0: no top-k filtering


class PromoteParams(Section):
    min_improvement: Annotated[float, Field(ge=0)] = 0.01  # bits per byte the gain's interval must clear (lower end)
    confidence: Annotated[float, Field(ge=0.5, lt=1)] = 0.95  # of the gain's bootstrap interval over test documents
    bootstrap_samples: Annotated[int, Field(ge=100, le=1_000_000)] = 10_000  # resamples of the test documents
    baseline_margin: Annotated[float, Field(ge=0)] = 0.5  # first rung: bits per byte under the unigram baseline
    max_bpb: Annotated[float, Field(ge=0)] = 0.0  # 0: no ceiling
    on_reject: Literal["fail", "continue"] = "fail"
    registered_model: Annotated[str, Field(min_length=1)] = "mmrec"
    growth_noise: Annotated[float, Field(ge=0, le=1)] = 0.0
    force_champion: bool = False  # move an alias even when the figures do not compare (other text, a subset, another metric)


class MlflowParams(Section):
    tracking_uri: str = "sqlite:///mlflow.db"  # relative paths resolve against the main repository
    artifact_root: str = "mlruns"
    experiment: Annotated[str, Field(min_length=1)] = "mmrec"
    lock_timeout_s: Annotated[float, Field(ge=0, le=86400)] = 120.0  # for a locked sqlite store, a registry lease
    system_metrics: bool = True  # MLflow's CPU/memory/GPU sampling of every run (false: off)


class CompareParams(Section):
    # `python -m mmrec.tracking.compare`: the std over seeds of a config's test figure, taken for a config that ran
    # with one seed (whose own spread is unmeasured); docs/measurements.md says where the value comes from
    seed_std: Annotated[float, Field(ge=0, le=1)] = 0.0027


# What cannot change a rung's trained weights nor its test figures: left out of a config's identity, so runs that
# differ only there (or in the seed) are runs of one config. A key not named here counts, so a key added to the
# schema splits configs rather than merging two that differ.
NOT_THE_MODEL = (
    "seed",  # the axis along which the runs of one config vary
    "data.timeout_s", "data.retries", "data.max_bytes",  # how a download is fetched, never what it holds
    "train.threads", "train.log_every", "train.checkpoint_dir",  # speed, logging, where last.pt waits
    "train.recompute",  # memory against time; the same weights
    "train.rdzv_endpoint",  # where the nodes meet (the resume fingerprint leaves it out too)
    "evaluate.batch_size",  # the same tokens scored, in other batches
    "evaluate.prompts", "evaluate.sample_tokens", "evaluate.temperature", "evaluate.top_k",  # samples.txt only
    "promote", "mlflow", "compare",  # the gate's verdict on a model, where runs are kept, how they are compared
)
IS_THE_MODEL = ("promote.growth_noise",)  # in the gate's section, but it changes a grown rung's weights
# What shapes growth and the training after it: of a grown rung's config, never of one trained from scratch
GROWTH_ONLY = ("train.growth_lr_scale", "train.rewarmup_steps", "train.growth_split", "promote.growth_noise")
# Params added after runs were first tagged with their config, and the value every run before them trained with:
# left out of the identity at that value, so a config's runs before and after the addition stay one group (a
# default changed later is not that value, so its runs are another config, as they should be)
ADDED_LATER = {"train.schedule": "cosine", "train.decay_fraction": 0.2, "train.optimizer": "adamw",
               "train.muon_momentum": 0.95, "model.tie_head": True}


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


class Params(Section):
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 1337
    data: DataParams = DataParams()
    tokenizer: TokenizerParams = TokenizerParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    ladder: dict[str, RungParams] = Field(default={  # validated too: the default ladder must fit the model
        "tiny": RungParams(width=128, layers=4),
        "mini": RungParams(width=256, layers=6, after="models/tiny/handoff.json", max_steps=1000, dropout=0.1,
                           ema_decay=0.995),
    }, validate_default=True)
    evaluate: EvaluateParams = EvaluateParams()
    promote: PromoteParams = PromoteParams()
    mlflow: MlflowParams = MlflowParams()
    compare: CompareParams = CompareParams()

    @field_validator("ladder")
    @classmethod
    def _ladder_chains(cls, ladder: dict[str, RungParams], info: ValidationInfo) -> dict[str, RungParams]:
        if not ladder:
            raise ValueError("must list at least one rung")
        model, train = info.data.get("model"), info.data.get("train")  # absent when they failed themselves
        seen: list[str] = []
        for name, rung in ladder.items():
            if not RUNG_NAME.match(name):
                raise ValueError(f"rung name {name!r} must match {RUNG_NAME.pattern}")
            if why := _not_an_alias(name):
                raise ValueError(f"rung name {name!r} cannot be the rung's registry alias: {why}; rename the rung")
            if train is not None and (clash := taken_by(name, train.checkpoint_dir)):
                mine, theirs = clash
                what = "is" if mine == theirs else f"would overlap {theirs},"
                raise ValueError(f"rung name {name!r} is taken: the rung's {mine} {what} another stage's output; "
                                 "rename the rung")
            if model is not None and model.arch == "gpt" and rung.width % model.head_dim:
                raise ValueError(f"ladder.{name}.width {rung.width} must be a multiple of model.head_dim "
                                 f"{model.head_dim} (arch 'gpt' splits the width into heads)")
            if rung.parent is not None and rung.parent not in seen:
                raise ValueError(f"ladder.{name}.after names {rung.parent!r}, which is not a rung above it")
            if rung.parent is not None:
                _check_growth(name, rung, rung.parent, ladder[rung.parent])
            seen.append(name)
        return ladder

    @field_validator("evaluate")
    @classmethod
    def _one_full_window(cls, evaluate: EvaluateParams, info: ValidationInfo) -> EvaluateParams:
        """The test figures need one window of seq_len targets, as check_fits asks of train and val: fewer
        score nothing (1 token) or may decode to no text at all (2 tokens: the bits per byte divide by 0)."""
        train = info.data.get("train")
        if train is not None and 0 < evaluate.max_tokens <= train.seq_len:
            raise ValueError(f"max_tokens {evaluate.max_tokens} must be 0 (every test token) or at least "
                             f"train.seq_len + 1 = {train.seq_len + 1} (one full window of scored tokens)")
        return evaluate

    def rung(self, name: str) -> RungParams:
        if name not in self.ladder:
            raise ParamsError(f"unknown rung {name!r}; the ladder has: {', '.join(self.ladder)}")
        return self.ladder[name]

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, as MLflow logs them."""
        return flatten(self.model_dump())

    def digest(self, *sections: str) -> str:
        """A stable hash of some sections (all when none named): equal configs hash equal."""
        dump = self.model_dump()
        picked = {k: dump[k] for k in sections} if sections else dump
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


    def config_identity(self, rung: str) -> dict[str, Any]:
        """What a run of `rung` is a run of, whatever its seed: dotted keys -> values of every param that can change
        the rung's weights or its test figures. The ladder counts by this rung and its ancestors only (another
        rung's entry trains other weights), GROWTH_ONLY for a grown rung only, and NOT_THE_MODEL is left out.
        The code and the data's content are not in it: runs before and after an edit of either share a config
        (their git_commit tags differ)."""
        chain, name = {}, rung
        while name is not None:
            chain[name] = self.rung(name).model_dump()
            name = self.ladder[name].parent
        flat = flatten(self.model_dump(exclude={"ladder"}) | {"ladder": chain})
        if len(chain) == 1:
            flat = {k: v for k, v in flat.items() if k not in GROWTH_ONLY}
        flat = {k: v for k, v in flat.items() if k not in ADDED_LATER or v != ADDED_LATER[k]}
        return {k: v for k, v in flat.items() if k in IS_THE_MODEL or not _under(k, NOT_THE_MODEL)}

    def config_digest(self, rung: str) -> str:
        """A short stable name of config_identity(rung): equal for runs of one config over any seeds."""
        return hashlib.sha256(json.dumps(self.config_identity(rung), sort_keys=True).encode()).hexdigest()[:12]


def _not_an_alias(name: str) -> str | None:
    """Why promote could not point an alias named after this rung at its version (None: it can): MLflow refuses
    the names of versions, and two of the registry's own aliases would merge with it."""
    if re.fullmatch(r"v\d+", name) or name == "latest":
        return "MLflow reserves v<digits> and 'latest' as names of versions"
    if name == CHAMPION:
        return f"'{CHAMPION}' is the alias of the best version of any rung"
    if name.startswith(EXPERIMENT_ALIAS):
        return f"'{EXPERIMENT_ALIAS}<name>' is the alias of the version of dvc experiment <name>"
    return None


def _check_growth(name: str, rung: RungParams, parent_name: str, parent: RungParams) -> None:
    """Growth is defined only for an integer width factor, the same memories and no fewer layers: checked
    here, before any stage runs, rather than when the child's training starts after its parent's."""
    if rung.width % parent.width:
        raise ValueError(f"ladder.{name}.width {rung.width} must be an integer multiple of "
                         f"ladder.{parent_name}.width {parent.width} (it grows from {parent_name})")
    if rung.memories != parent.memories:
        raise ValueError(f"ladder.{name}.memories {rung.memories} must equal ladder.{parent_name}.memories "
                         f"{parent.memories} (growth keeps the memories)")
    if rung.layers < parent.layers:
        raise ValueError(f"ladder.{name}.layers {rung.layers} must not be fewer than "
                         f"ladder.{parent_name}.layers {parent.layers} (growth only adds layers)")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def flat_params_text(text: str) -> dict[str, Any]:
    """The keys of a params.yaml text (another commit's, say) as dotted keys, unvalidated; {} when it is no
    YAML mapping: for telling what changed, never for running."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    return flatten(tree) if isinstance(tree, dict) else {}


def _one_line(err: ValidationError) -> str:
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"]) or "(top level)"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        return f"params.yaml: unknown key '{key}' (a typo?)"
    if e["type"] == "missing":
        return f"params.yaml: '{key}' is required"
    if isinstance(e.get("input"), dict):  # a rule across keys: the section says it all
        return f"params.yaml: {key}: {msg}"
    return f"params.yaml: {key} = {e.get('input')!r}: {msg}"


def parse_params(raw: Any) -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError("params.yaml: the top level must be a mapping of sections")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_one_line(err)) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run from the repository root)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}:{where}: not valid YAML") from None
    return parse_params(raw)


def workspace_params() -> Params:
    """For the commands that read the store (compare, the registry): params.yaml of the current directory, else
    the schema's defaults (run outside a checkout)."""
    return load_params() if PARAMS_FILE.exists() else Params()


def load_rung_params(argv: list[str], stage: str) -> tuple[Params, str]:
    """For the per-rung stages: `python stages/<stage>.py <rung>` -> (validated params, rung name)."""
    if len(argv) != 1:
        raise UserError(f"usage: python stages/{stage}.py <rung>")
    params = load_params()
    params.rung(argv[0])  # an unknown rung fails here, before torch or mlflow is imported
    return params, argv[0]
