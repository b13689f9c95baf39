"""The README and the docs/ pages against the code, so the two cannot drift apart: every command in
their shell blocks parses with its script's own argument parser, and every saferegion call in their
Python blocks binds to the function's signature."""

import ast
import inspect
import re
import shlex
from pathlib import Path

import pytest

import bench
import evaluate
import saferegion as sr
import sample
import toyworld
import train
from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
PAGES = sorted((ROOT / "docs").glob("*.md"))
DOCUMENTS = {"README.md": README, **{f"docs/{page.name}": page.read_text(encoding="utf-8") for page in PAGES}}
PARSERS = {"train.py": train.parse_args, "sample.py": sample.parse_args, "evaluate.py": evaluate.parse_args,
           "bench.py": bench.parse_args, "toyworld.py": toyworld.parse_args}
SEPARATORS = {"&&", "||", ";", "|", "do", "done", "then"}


def blocks(language, text):
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def shell_commands(text):
    """Each simple command of a shell block as a list of words: comments dropped, split at && ; | do."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True  # words as the shell splits them; '#' starts a comment
        words = []
        for word in [*lexer, ";"]:
            if word in SEPARATORS:
                commands += [words] if words else []
                words = []
            else:
                words.append(word)
    return commands


def script_calls(text):
    """(script, argv) for every call of one of the project's scripts."""
    calls = []
    for words in shell_commands(text):
        for i, word in enumerate(words):
            if Path(word).name in PARSERS:
                calls.append((Path(word).name, words[i + 1:]))
                break
    return calls


def parses(script, argv):
    try:
        PARSERS[script](argv)
        return True
    except SystemExit:
        return False


CALLS = [(name, *call) for name, text in DOCUMENTS.items() for block in blocks("bash", text)
         for call in script_calls(block)]


def test_the_readme_has_the_commands_people_copy():
    scripts = {script for _, script, _ in CALLS}
    assert scripts == set(PARSERS) and len(CALLS) >= 25, CALLS


def test_the_command_finder_reads_shell_as_a_shell_does():
    text = 'python3 -m venv .venv && .venv/bin/python train.py --concept nudity  # a comment\n' \
           'for run in runs/*; do python evaluate.py nsfw $run --q16 "q 16.p"; done\n' \
           'accelerate launch sample.py --prompt "a; b"'
    assert script_calls(text) == [("train.py", ["--concept", "nudity"]),
                                  ("evaluate.py", ["nsfw", "$run", "--q16", "q 16.p"]),
                                  ("sample.py", ["--prompt", "a; b"])]
    assert not parses("train.py", ["--concpet", "nudity"])  # a misspelt flag is caught


@pytest.mark.parametrize("document, script, argv", CALLS, ids=[" ".join([d, s, *a])[:90] for d, s, a in CALLS])
def test_every_readme_command_parses_with_its_script(document, script, argv, capsys):
    assert parses(script, argv), capsys.readouterr().err


def saferegion_calls():
    """Every sr.NAME(...) call in the Python blocks of the README and docs/, as (name, number of positional
    args, keywords)."""
    calls = []
    for block in [block for text in DOCUMENTS.values() for block in blocks("python", text)]:
        for node in ast.walk(ast.parse(block)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "sr"):
                calls.append((node.func.attr, len(node.args), [k.arg for k in node.keywords]))
    return calls


def test_every_readme_python_call_matches_the_signature():
    calls = saferegion_calls()
    assert {name for name, _, _ in calls} >= {"load_pipeline", "load_direction", "generate", "train", "Steering"}
    for name, positional, keywords in calls:
        assert hasattr(sr, name), f"saferegion has no {name}"
        signature = inspect.signature(getattr(sr, name))
        signature.bind(*[None] * positional, **dict.fromkeys(keywords))  # TypeError where they disagree


def test_the_readme_links_every_docs_page_and_each_link_leads_to_one():
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)", README))
    assert len(PAGES) >= 7 and linked == {f"docs/{page.name}" for page in PAGES}, linked



def test_the_commands_of_the_docs_pages_are_checked_too():
    pages = {document for document, _, _ in CALLS} - {"README.md"}
    assert pages >= {"docs/reproducing.md", "docs/evaluation.md", "docs/families.md", "docs/combining.md",
                      "docs/performance.md"}, pages
