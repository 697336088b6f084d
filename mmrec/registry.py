"""The model registry: a promoted checkpoint logged as a pyfunc text generator and registered as a version."""
from __future__ import annotations

import logging
from pathlib import Path

import mlflow

from mmrec.inference import generate, load_model
from mmrec.tokenizer import load_tokenizer
from mmrec.track import Run, fluent_store


class MMRecPyfunc(mlflow.pyfunc.PythonModel):
    """`models:/<name>@champion` as a text generator: a list of prompts in, each continued greedily out
    (params={"max_new_tokens": N}, 40 by default)."""

    def load_context(self, context) -> None:
        self.model, _ = load_model(context.artifacts["checkpoint"])
        self.sp = load_tokenizer(context.artifacts["tokenizer"])

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        n = int((params or {}).get("max_new_tokens", 40))
        out = []
        for prompt in model_input:
            ids = self.sp.encode(prompt)
            out.append(self.sp.decode(ids + generate(self.model, ids, n, greedy=True, eos_id=self.sp.eos_id())))
        return out


def register(run: Run, name: str, checkpoint: Path, tokenizer: Path, aliases: list[str]) -> str:
    """Log the checkpoint as a pyfunc model in `run`, register it as a new version of `name`, point the aliases at it."""
    code = Path(__file__).resolve().parent  # the mmrec package travels with the model
    # the wrapper holds no state (weights travel as artifacts), so pickling it is safe: quiet that warning
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)
    # the whole block runs against this store: the registry looks the logged model up through a default client
    with fluent_store(run.client.tracking_uri):
        with mlflow.start_run(run_id=run.id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=MMRecPyfunc(), code_paths=[str(code)],
                input_example=(["In the beginning"], {"max_new_tokens": 4}),  # input and params: the signature
                artifacts={"checkpoint": str(checkpoint), "tokenizer": str(tokenizer)},
                pip_requirements=[f"torch=={_version('torch')}", f"sentencepiece=={_version('sentencepiece')}",
                                  f"numpy=={_version('numpy')}", f"pydantic=={_version('pydantic')}"])
        try:
            run.client.create_registered_model(name)
        except mlflow.exceptions.MlflowException:
            pass  # it exists already (or a concurrent promotion made it)
        version = run.client.create_model_version(name, info.model_uri, run_id=run.id).version
        for alias in aliases:
            run.client.set_registered_model_alias(name, alias, version)
    return str(version)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
