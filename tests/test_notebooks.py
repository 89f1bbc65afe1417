"""Notebooks: paired with jupytext, committed without outputs, thin, and they run headless."""
from __future__ import annotations

import json
from pathlib import Path

import jupytext
import pytest

from dimkit import notebooks as nbrun

ROOT = Path(__file__).resolve().parents[1]
PY_FILES = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
IPYNB_FILES = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells if c.source.strip()]


def test_there_are_notebooks():
    assert PY_FILES and IPYNB_FILES
    assert [p.stem for p in PY_FILES] == [p.stem for p in IPYNB_FILES], "every .py has its .ipynb and back"


@pytest.mark.parametrize("py", PY_FILES, ids=lambda p: p.stem)
def test_pair_in_sync(py):
    ipynb = py.with_suffix(".ipynb")
    assert _cells(jupytext.read(py)) == _cells(jupytext.read(ipynb)), (
        f"{py.name} and {ipynb.name} drifted: run `make sync-notebooks`")


@pytest.mark.parametrize("ipynb", IPYNB_FILES, ids=lambda p: p.stem)
def test_committed_without_outputs(ipynb):
    nb = json.loads(ipynb.read_text())
    for cell in nb["cells"]:
        assert not cell.get("outputs"), f"{ipynb.name} carries outputs: clear them"
        assert cell.get("execution_count") is None, f"{ipynb.name} carries execution counts"


@pytest.mark.parametrize("ipynb", IPYNB_FILES, ids=lambda p: p.stem)
def test_one_flat_parameters_cell_and_environment_first(ipynb):
    nb = jupytext.read(ipynb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    lines = [ln for ln in tagged[0].source.splitlines() if ln.strip() and not ln.startswith("#")]
    for ln in lines:
        assert ":" in ln.split("=")[0] and "=" in ln, f"parameter line not 'name: type = literal': {ln}"
    assert any(ln.startswith("dataset: str") for ln in lines)
    for secret in ("api_key", "OPENAI_API_KEY", "token", "password"):
        assert secret not in tagged[0].source, "secrets never go in parameters"
    assert "print_environment" in code[0].source, "the first code cell stamps the environment"


def test_dataset_parameter_mapping():
    by_name = {p.stem[:2]: p for p in IPYNB_FILES}
    assert nbrun.dataset_for(by_name["00"], "rich") == "richpediamel"
    for num in ("02", "03"):
        if num in by_name:
            assert nbrun.dataset_for(by_name[num], "sample") == "sample+"
            assert nbrun.dataset_for(by_name[num], "rich+") == "richpediamel+"


@pytest.fixture(scope="module")
def shared_dirs(tmp_path_factory):
    """One data/cache/runs folder for the notebook runs of this module: each notebook builds what it
    needs if it is missing, so any one runs alone, and in order they reuse each other's stores."""
    root = tmp_path_factory.mktemp("notebooks")
    with pytest.MonkeyPatch.context() as mp:
        for var, sub in (("DIMKIT_DATA", "data"), ("DIMKIT_CACHE", "cache"), ("DIMKIT_RUNS", "runs"),
                         ("DIMKIT_FIGURES", "figures")):
            (root / sub).mkdir()
            mp.setenv(var, str(root / sub))
        yield root


@pytest.mark.slow
@pytest.mark.parametrize("notebook", IPYNB_FILES, ids=lambda p: p.stem)
def test_notebook_runs_on_the_sample(notebook, shared_dirs):
    """What `make demo` does for this notebook; a failure names the notebook and its cell."""
    [run] = nbrun.run_notebooks("sample", out_dir=shared_dirs / "runs" / "notebooks", only=[notebook.stem[:2]])
    nb = json.loads(Path(run.output).read_text())
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.slow
def test_a_dataset_that_is_not_prepared_fails_in_the_cell_after_the_parameters(kit_dirs, tmp_path):
    import papermill

    nb = ROOT / "notebooks" / "03_train.ipynb"
    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(str(nb), str(tmp_path / "out.ipynb"), parameters={"dataset": "rich+"},
                                   kernel_name="python3", cwd=str(nb.parent), progress_bar=False)
    assert "'richpediamel+' is not prepared" in err.value.evalue
    out = jupytext.read(tmp_path / "out.ipynb")
    code = [c for c in out.cells if c.cell_type == "code"]
    failed = next(i for i, c in enumerate(code) if any(o.get("output_type") == "error" for o in c.get("outputs", [])))
    params = max(i for i, c in enumerate(code) if "parameters" in c.metadata.get("tags", [])
                 or "injected-parameters" in c.metadata.get("tags", []))
    assert failed == params + 1, "the first cell after the parameters names the missing dataset"


@pytest.fixture
def no_kernel(monkeypatch):
    """Any notebook execution fails the test: the checks below come before a kernel starts."""
    import papermill

    def execute(*args, **kwargs):
        raise AssertionError("a kernel was started")

    monkeypatch.setattr(papermill, "execute_notebook", execute)


@pytest.mark.parametrize("name, expect", [
    ("nosuch", "dataset 'nosuch' is not prepared here"),
    ("No Such!", "invalid dataset name 'No Such!'"),
])
def test_an_unknown_dataset_is_refused_before_any_kernel_starts(kit_dirs, capsys, no_kernel, name, expect):
    from dimkit import cli

    assert cli.main(["notebooks", "--dataset", name]) == 2
    err = capsys.readouterr().err
    assert "dimkit notebooks: error: --dataset" in err and expect in err and "Traceback" not in err
    if name == "nosuch":
        assert str(kit_dirs["data"] / "nosuch" / "meta.json") in err and "dimkit prepare SRC --name nosuch" in err
    assert not (kit_dirs["runs"] / "notebooks").exists()
    # the same from Python, named as an argument
    with pytest.raises(nbrun.ConfigError, match="dataset"):
        nbrun.run_notebooks(name)


def test_a_bundled_or_prepared_dataset_passes_the_check(kit_dirs):
    assert nbrun.check_dataset("sample") == "sample" and nbrun.check_dataset("sample+") == "sample+"
    (kit_dirs["data"] / "richpediamel").mkdir()
    (kit_dirs["data"] / "richpediamel" / "meta.json").write_text("{}")
    assert nbrun.check_dataset("rich") == "richpediamel"


def test_only_without_a_value_runs_nothing(kit_dirs, capsys, no_kernel):
    from dimkit import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["notebooks", "--only"])
    assert exit_.value.code == 2 and "--only" in capsys.readouterr().err
    with pytest.raises(nbrun.ConfigError, match="name the notebooks to run by number"):
        nbrun.run_notebooks("sample", only=[])
    with pytest.raises(nbrun.ConfigError, match="no notebook matches 99"):
        nbrun.run_notebooks("sample", only=["99"])
