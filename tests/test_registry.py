"""Registry loading: named modules, the built-ins, and the entry-point group."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from jacobian_service.errors import FunctionNotFound, InvalidInput
from jacobian_service.registry import ENTRY_POINT_GROUP, Input, Registry


def test_entry_point_group_contributes_functions(tmp_path, monkeypatch):
    (tmp_path / "ep_functions.py").write_text(
        textwrap.dedent(
            """
            import torch
            from jacobian_service import Input, register

            @register(inputs=[Input("v", shape=(3,))], description="from an installed package")
            def cube(v):
                return v**3
            """
        )
    )
    dist = tmp_path / "ep_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\ndemo = ep_functions\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry.from_modules()
    assert "cube" in registry and "sin" in registry  # beside the built-ins
    assert registry.get("cube").description == "from an installed package"
    assert "cube" not in Registry.from_modules(use_entry_points=False)
    sys.modules.pop("ep_functions", None)


def test_named_modules_replace_the_builtins_and_names_must_be_unique():
    registry = Registry.from_modules(["tests.user_functions"], use_entry_points=False)
    assert "scaled_norm" in registry and "sin" not in registry
    with pytest.raises(ValueError, match="two functions named"):
        Registry(list(Registry.from_modules(use_entry_points=False)) * 2)


def test_lookups_and_argnums():
    registry = Registry.from_modules(use_entry_points=False)
    with pytest.raises(FunctionNotFound, match="did you mean 'softmax'"):
        registry.get("softmx")
    spec = registry.get("add_square")
    assert spec.argnums(0) == ((0,), False)
    assert spec.argnums("y") == ((1,), False)
    assert spec.argnums(["y", 0]) == ((1, 0), True)
    assert spec.argnums(-1) == ((1,), False)
    for bad in ([], [0, "x"], 2, "z", True, 1.0):
        with pytest.raises(InvalidInput):
            spec.argnums(bad)


def test_input_declarations_are_checked():
    with pytest.raises(ValueError):
        Input("x", shape=(-1,))
    with pytest.raises(ValueError):
        Input("x", dtype="complex")  # (complex64 and complex128 are declared: test_complex_inputs)
    inp = Input("x", shape=("n", 3), dtype="float32")
    bindings: dict = {}
    inp.bind((5, 3), bindings)
    assert bindings == {"n": (5, "x")}
    with pytest.raises(InvalidInput, match=r"expected shape \(n, 3\) with n = 5"):
        Input("y", shape=("n", 3)).bind((4, 3), bindings)
    assert inp.resolve_dtype("float64") == "float32"  # same_kind
    assert inp.resolve_dtype("int64") == "float32"
    with pytest.raises(InvalidInput):
        Input("k", dtype="int64").resolve_dtype("float64")
    assert Input("f").resolve_dtype("bfloat16") == "bfloat16"
    assert Input("f").resolve_dtype("int32") == "float32"


@pytest.mark.parametrize("name", ["a/b", ".", "..", "tab\there"])
def test_a_function_name_no_url_can_reach_is_refused_at_registration(name):
    """``@register(name="a/b")`` (or ``".."``) was listed by /v1/functions while every
    call of it was a 404: the SDK sends a/b as a%2Fb, which the server reads as two path
    segments, and clients resolve ``..`` away. Such a name now fails at import, naming it."""
    from jacobian_service.registry import register

    with pytest.raises(ValueError, match="function names"):
        register(name=name, inputs=[Input("x")])(lambda x: x)
    register(name="with space-and.dot", inputs=[Input("x")])(lambda x: x)  # a URL reaches these (quoted)


@pytest.mark.parametrize("name", ["x,y", "a/b", "0", "-1", "", "new\nline"])
def test_an_input_name_no_request_can_select_is_refused(name):
    """An input named ``x,y`` could not be selected by a query's argnums (``x,y`` is a
    list there: the SDK's binary calls got 422 "'x' is not a parameter"); ``a/b`` is two
    levels of an .npz member's path; ``0`` is a position in both."""
    with pytest.raises(ValueError, match="input names"):
        Input(name)
    Input("x_1")


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A user's folder holding their module, as the working directory; sys.path as it was after."""
    (tmp_path / "docs_user_functions.py").write_text(textwrap.dedent(
        """
        from jacobian_service import Input, register

        @register(inputs=[Input("q", shape=("k",))], description="the user's own")
        def users_arm(q):
            return q.cos()
        """))
    (tmp_path / "needs_a_missing_dependency.py").write_text("import no_such_dependency_docs6\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield tmp_path
    for name in ("docs_user_functions", "needs_a_missing_dependency"):
        sys.modules.pop(name, None)


def test_functions_finds_a_module_in_the_working_directory_as_serve_does(user_folder, capsys):
    """`serve`'s engines run as `python -m`, which puts the working directory on the path:
    the README's `JACOBIAN_SERVICE_FUNCTIONS=my_functions jacobian-service serve` served
    my_functions.py from there, while `jacobian-service functions` (and `serve
    --in-process`) raised ModuleNotFoundError for the same module."""
    from jacobian_service.cli import main

    assert main(["functions", "--functions", "docs_user_functions"]) == 0
    assert "users_arm(q: (k,) floating)" in capsys.readouterr().out


def test_a_function_module_on_no_path_is_one_line_saying_what_to_do(user_folder, capsys):
    from jacobian_service.cli import main
    from jacobian_service.registry import FunctionModuleNotFound

    assert main(["functions", "--functions", "jacobian_service.examples,no_such_module_docs6"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "cannot load the function module 'no_such_module_docs6'" in err and "PYTHONPATH" in err
    # A module the user's module imports and lacks is theirs to see, traceback and all.
    with pytest.raises(ModuleNotFoundError) as raised:
        Registry.from_modules(["needs_a_missing_dependency"], use_entry_points=False)
    assert raised.value.name == "no_such_dependency_docs6" and not isinstance(raised.value, FunctionModuleNotFound)


def test_a_reader_that_stops_early_gets_no_traceback(monkeypatch, capsys):
    """`jacobian-service functions | head` printed a BrokenPipeError traceback once head
    had its lines (so did `call ... --pattern | head`)."""
    import os

    from jacobian_service.cli import main

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    with os.fdopen(write, "w") as pipe:
        monkeypatch.setattr(sys, "stdout", pipe)
        assert main(["functions", "--functions", "jacobian_service.examples"]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_a_bad_setting_stops_the_cli_with_one_line_naming_the_variable(monkeypatch, tmp_path, capsys):
    """A bad JACOBIAN_SERVICE_* value, or a keys file that holds no key or is missing,
    stopped `serve` with a Python traceback ending in pydantic's 'max_queue: Input should
    be a valid integer': the user set JACOBIAN_SERVICE_MAX_QUEUE. Now one line per bad
    variable, in the environment's names, with the value given, and exit 2."""
    from jacobian_service.cli import main

    monkeypatch.setattr(sys, "path", list(sys.path))  # main puts the working directory on it
    monkeypatch.setenv("JACOBIAN_SERVICE_PORT", "1")  # were serve to start after all, nothing to collide with
    monkeypatch.setenv("JACOBIAN_SERVICE_MAX_QUEUE", "lots")
    monkeypatch.setenv("JACOBIAN_SERVICE_DEVICE", "gpu")
    assert main(["functions"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "jacobian-service: JACOBIAN_SERVICE_DEVICE='gpu': device must be auto, cpu, cuda or cuda:N",
        "jacobian-service: JACOBIAN_SERVICE_MAX_QUEUE='lots': Input should be a valid integer, unable to parse "
        "string as an integer",
    ]
    monkeypatch.delenv("JACOBIAN_SERVICE_MAX_QUEUE")
    monkeypatch.delenv("JACOBIAN_SERVICE_DEVICE")
    # Refused before anything starts: no engine, no socket.
    (tmp_path / "keys").write_text("# nobody yet\n")
    for keys, why in ((tmp_path / "keys", "holds no keys; refusing to start without auth"),
                      (tmp_path / "missing", "cannot be read: No such file or directory")):
        monkeypatch.setenv("JACOBIAN_SERVICE_API_KEYS_FILE", str(keys))
        assert main(["serve"]) == 2
        assert capsys.readouterr().err == f"jacobian-service: API_KEYS_FILE {keys} {why}\n"
    # With JSON logs (the image's), the same line as a log collector reads it.
    monkeypatch.setenv("JACOBIAN_SERVICE_LOG_FORMAT", "json")
    assert main(["serve"]) == 2
    line = json.loads(capsys.readouterr().err)
    assert line["level"] == "error" and line["message"] == f"API_KEYS_FILE {keys} cannot be read: No such file or directory"


def test_serve_warns_of_variables_no_setting_reads(monkeypatch, tmp_path, capsys):
    """pydantic ignores JACOBIAN_SERVICE_* names it does not know: a typo went unnoticed,
    and so did the client's JACOBIAN_SERVICE_API_KEY (`jacobian-service call`'s) set
    where the server's API_KEYS was meant, leaving the server without auth."""
    from jacobian_service.cli import main
    from jacobian_service.settings import Settings, unknown_variables

    monkeypatch.setenv("JACOBIAN_SERVICE_MAX_QUEU", "8")
    monkeypatch.setenv("JACOBIAN_SERVICE_URL", "http://elsewhere:8000")  # the client CLI's: not warned of
    (tmp_path / "keys").write_text("")
    monkeypatch.setenv("JACOBIAN_SERVICE_API_KEYS_FILE", str(tmp_path / "keys"))  # stops serve after the warning
    monkeypatch.setenv("JACOBIAN_SERVICE_PORT", "1")
    assert main(["serve"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "jacobian-service: warning: JACOBIAN_SERVICE_MAX_QUEU is no setting of the server, which ignores it; "
        "did you mean JACOBIAN_SERVICE_MAX_QUEUE?")
    client_key = {"JACOBIAN_SERVICE_API_KEY": "secret"}
    assert unknown_variables(client_key, Settings.model_fields) == [
        "JACOBIAN_SERVICE_API_KEY is the key `jacobian-service call` sends; the server's keys are "
        "JACOBIAN_SERVICE_API_KEYS (or _API_KEYS_FILE), and with none set it serves without auth"]
    assert unknown_variables({**client_key, "JACOBIAN_SERVICE_API_KEYS": "secret"}, Settings.model_fields) == []
