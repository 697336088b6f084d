"""mmrec/tracking/store.py: the store's faults as one line that names the store and the fix, and where the
commands that only read a store find it."""
import errno

import pytest
from mlflow.exceptions import MlflowException
from sqlalchemy.exc import OperationalError

from mmrec.errors import UserError
from mmrec.tracking import store


@pytest.mark.parametrize("err, says", [
    (OperationalError("SELECT", {}, Exception("file is not a database")), "not an SQLite database"),
    (OperationalError("SELECT", {}, Exception("attempt to write a readonly database")), "cannot open the database"),
    (ConnectionError("Max retries exceeded with url"), "unreachable (ConnectionError); start the tracking server"),
    (MlflowException("something odd\nwith a second line"), "MLflow store S: something odd"),
])
def test_each_fault_reads_as_one_line_naming_the_store_and_what_to_do(err, says):
    line = store.describe(err, "S")
    assert line.startswith("MLflow store S: ") and says in line and "\n" not in line


def test_an_unwritable_artifact_folder_names_the_folder():
    err = PermissionError(errno.EACCES, "Permission denied", "/srv/mlruns")
    assert store.describe(err, "S") == ("MLflow store S: cannot write /srv/mlruns (Permission denied); make it a "
                                         "writable directory or set mlflow.artifact_root")


def test_faults_as_errors_turns_a_store_fault_into_a_store_error_and_lets_others_through():
    with pytest.raises(store.StoreError, match="^MLflow store S: unreachable"):
        with store.faults_as_errors("S"):
            raise ConnectionRefusedError("Connection refused")
    with pytest.raises(ZeroDivisionError):
        with store.faults_as_errors("S"):
            1 / 0


def test_reading_commands_refuse_a_local_store_that_does_not_exist_instead_of_creating_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="^no MLflow store at .*mlflow.db .*train a rung first or pass --tracking-uri"):
        store.store_settings(None, None)
    assert not (tmp_path / "mlflow.db").exists()
    uri = f"sqlite:///{tmp_path}/other.db"
    (tmp_path / "other.db").touch()
    assert store.store_settings(uri, "exp") == (uri, "exp")
