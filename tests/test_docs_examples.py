"""The docs' examples run as written: every ``curl`` against ``localhost:8000`` and every
``python -c`` of the README's and docs/*.md's shell blocks, in order, in one folder (the
``python -c`` lines make the ``.npy`` files the ``curl`` lines send, and read back what
they save), against the in-process app. A ``# ...`` comment after a command is what the
docs say it prints: ``python -c`` must print exactly that, and a curl's JSON must hold
every key the comment shows. So a renamed field, option or route, or a changed shape,
fails here instead of in a new user's terminal."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FILE = re.compile(r"""["']([\w.-]+\.np[yz])["']""")  # a file a python -c line saves or loads
_BLOCK = re.compile(r"^([ \t]*)```bash\n(.*?)^[ \t]*```", re.S | re.M)  # in list items too


def _commands(text: str) -> Iterator[tuple[list[str], str]]:
    """(argv, what the comments after it say) per command of each bash block; a line
    ending in ``\\`` goes on, a comment line right after a command is its output."""
    for indent, block in _BLOCK.findall(text):
        lines = [line.removeprefix(indent) for line in block.replace("\\\n", " ").splitlines()]
        i = 0
        while i < len(lines):
            words = shlex.split(lines[i])
            i += 1
            cut = next((k for k, w in enumerate(words) if w.startswith("#")), len(words))
            comment = [" ".join(words[cut:])[1:].strip()] if cut < len(words) else []
            while i < len(lines) and lines[i].lstrip().startswith("#"):
                comment.append(lines[i].lstrip()[1:].strip())
                i += 1
            if words[:cut]:
                yield words[:cut], "\n".join(c for c in comment if c)


def _examples() -> Iterator[tuple[str, list[str], str]]:
    for path in DOCS:
        for argv, says in _commands(path.read_text()):
            if argv[:2] == ["python", "-c"] or argv[0] == "curl" and any("localhost:8000" in w for w in argv):
                yield path.name, argv, says


def _curl(client: Any, argv: list[str], folder: Path) -> Any:
    url = next(w for w in argv if "localhost:8000" in w)
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    headers: dict[str, str] = {}
    method, body, out = "GET", None, None
    args = iter(argv[1:])
    for word in args:
        if word == "-H":
            name, _, value = next(args).partition(":")
            headers[name.strip()] = value.strip()
        elif word in ("-d", "--data", "--data-binary"):
            data = next(args)
            body = (folder / data[1:]).read_bytes() if data.startswith("@") else data.encode()
            method = "POST" if method == "GET" else method
        elif word == "-X":
            method = next(args)
        elif word == "-o":
            out = next(args)
        elif word not in ("-s", "-i") and word != url:
            raise AssertionError(f"a curl option this test does not read: {word} (teach it)")
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    response = client.request(method, target, headers=headers, content=body)
    if out is not None:
        (folder / out).write_bytes(response.content)
    return response


def _keys(doc: Any) -> set[str]:
    if isinstance(doc, dict):
        return set(doc) | {k for v in doc.values() for k in _keys(v)}
    if isinstance(doc, list):
        return {k for v in doc for k in _keys(v)}
    return set()


def test_the_docs_shell_examples_run_as_written(client, tmp_path):
    # One folder for all, in order (sparse.md sends the README's x.npy), named in full:
    # not the working directory, which the in-process engine puts back after each batch.
    ran = 0
    for doc, argv, says in _examples():
        shown = f"{doc}: {' '.join(argv)[:120]}"
        ran += 1
        if argv[0] == "python":
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(_FILE.sub(lambda m: repr(str(tmp_path / m[1])), argv[2]), {})
            if says:
                assert printed.getvalue().strip() == says, shown
            continue
        response = _curl(client, argv, tmp_path)
        assert response.status_code == 200, (shown, response.text[:500])
        shows = set(re.findall(r'"([A-Za-z_]\w*)":', says))
        if shows:
            missing = shows - _keys(response.json())
            assert not missing, f"{shown}: the docs show {sorted(missing)}, the answer has none"
    assert ran >= 10, f"only {ran} examples found: has the docs' layout changed?"


def _section(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n{heading}\n")
    level = heading.split(" ")[0]
    end = min((i for i in (text.find(f"\n{h} ", start + 1) for h in ("#" * n for n in range(1, len(level) + 1)))
               if i != -1), default=len(text))
    return text[start:end]


def test_the_readme_lists_every_error_code_with_its_status_and_sdk_exception():
    """The README's error table is the users' list of codes: every code the server can
    send, at its status, with the exception the SDK raises for it (the SPEC's table
    lists only v1's, and lives outside the repository)."""
    import jacobian_client
    from jacobian_client import _errors
    from jacobian_client.wire import PROBLEM_STATUS

    rows = re.findall(r"^\| (\d{3}) \| `(\w+)` \| `(\w+)`", _section("### Errors"), re.M)
    documented = {code: (int(status), exc) for status, code, exc in rows}
    assert len(documented) == len(rows), "a code listed twice"
    sent = {code: status for code, status in PROBLEM_STATUS.items() if code != "client_closed"}  # logged only
    assert {code: status for code, (status, _) in documented.items()} == sent
    for code, (_, exc) in documented.items():
        raised = _errors._BY_CODE.get(code, _errors.APIError)
        assert exc == raised.__name__, f"{code}: the README says {exc}, the SDK raises {raised.__name__}"
        assert getattr(jacobian_client, exc) is raised, f"{exc} is not importable from jacobian_client"


def test_the_readme_settings_table_names_every_setting():
    """"Every setting is an environment variable": the README's table is where a user
    looks them up, so every field of Settings is in it, and nothing else is."""
    from jacobian_service.settings import Settings

    cells = re.findall(r"^\| ([^|]*`[A-Z_]+`[^|]*) \|", _section("## Settings"), re.M)
    documented = {name.lower() for cell in cells for name in re.findall(r"`([A-Z0-9_]+)`", cell)}
    assert documented == set(Settings.model_fields)


def test_the_docs_links_lead_somewhere():
    """Every relative link of the README and docs/*.md names a file of the repository, and
    its #anchor a heading there (GitHub's slugs): a renamed section or a document outside
    the repository (the README once sent users to ../shared/SPEC.md) is a dead end."""
    def slug(heading: str) -> str:
        return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")

    dead = []
    for path in DOCS:
        for link in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+:", link):
                continue
            file, _, anchor = link.partition("#")
            target = (path.parent / file).resolve() if file else path
            if ROOT not in target.parents or not target.exists():
                dead.append(f"{path.name}: {link}")
            elif anchor and anchor not in {slug(h) for h in re.findall(r"^#+ (.*)$", target.read_text(), re.M)}:
                dead.append(f"{path.name}: {link} (no such heading)")
    assert not dead
