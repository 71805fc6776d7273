"""``mta passwd add|remove|list`` as a user runs it: a subprocess."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env
from mta.auth.passwords import verify_password
from mta.auth.users import read_users_file


def mta(*args: str, cwd: Path, stdin: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("mta")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "mta.cli"]
    e = subprocess_env()
    e.pop("MTA_CONFIG", None)
    e.update(env or {})
    return subprocess.run([*cmd, *args], cwd=cwd, input=stdin, capture_output=True, text=True,
                          env=e, timeout=60,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


@pytest.fixture
def site(tmp_path):
    """A working directory with etc/mta.toml naming etc/users (relative, as shipped)."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "mta.toml").write_text('[auth]\nusers_file = "etc/users"\n')
    return tmp_path


def users(site) -> dict[str, str]:
    entries, problems = read_users_file(str(site / "etc" / "users"))
    assert not problems
    return {e.user: e.hash for e in entries if e.user}


def test_add_list_change_remove(site):
    r = mta("passwd", "add", "alice@example.test", "--password-stdin", cwd=site, stdin="pw one\n")
    assert (r.returncode, r.stdout, r.stderr) == (0, "etc/users: added user alice@example.test\n", "")
    r = mta("passwd", "add", "bob", "--password-stdin", cwd=site, stdin="bob pw\r\n")
    assert r.returncode == 0, r.stderr
    stored = users(site)
    assert list(stored) == ["alice@example.test", "bob"]
    assert verify_password("pw one", stored["alice@example.test"])
    assert verify_password("bob pw", stored["bob"])           # CRLF stripped
    assert (site / "etc" / "users").stat().st_mode & 0o777 == 0o600

    r = mta("passwd", "list", cwd=site)
    assert (r.returncode, r.stdout) == (0, "alice@example.test\nbob\n")

    r = mta("passwd", "add", "alice@example.test", "--password-stdin", cwd=site, stdin="pw two")
    assert r.returncode == 0 and "changed password of user alice@example.test" in r.stdout
    stored = users(site)
    assert list(stored) == ["alice@example.test", "bob"]        # order kept
    assert verify_password("pw two", stored["alice@example.test"])

    r = mta("passwd", "remove", "alice@example.test", cwd=site)
    assert (r.returncode, r.stdout) == (0, "etc/users: removed user alice@example.test\n")
    assert list(users(site)) == ["bob"]


def test_config_option(tmp_path, site):
    other = tmp_path / "elsewhere.toml"
    other.write_text(f'[auth]\nusers_file = "{tmp_path}/other-users"\n')
    r = mta("passwd", "add", "carol", "--password-stdin", "--config", str(other), cwd=site,
            stdin="x\n")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "other-users").read_text().startswith("carol:$scrypt$")
    assert not (site / "etc" / "users").exists()


def test_mta_config_environment_variable(tmp_path, site):
    # As for `mta queue` and sendmail: --config, else $MTA_CONFIG, else etc/mta.toml.
    other = tmp_path / "elsewhere.toml"
    other.write_text(f'[auth]\nusers_file = "{tmp_path}/other-users"\n')
    env = {"MTA_CONFIG": str(other)}
    r = mta("passwd", "add", "carol", "--password-stdin", cwd=site, stdin="x\n", env=env)
    assert (r.returncode, r.stdout, r.stderr) == (
        0, f"{tmp_path}/other-users: added user carol\n", "")
    assert not (site / "etc" / "users").exists()
    assert mta("passwd", "list", cwd=site, env=env).stdout == "carol\n"
    # --config wins over the variable.
    r = mta("passwd", "add", "dave", "--password-stdin", "--config", "etc/mta.toml", cwd=site,
            stdin="x\n", env=env)
    assert (r.returncode, r.stdout) == (0, "etc/users: added user dave\n")
    assert list(users(site)) == ["dave"]
    r = mta("passwd", "list", cwd=site, env={"MTA_CONFIG": str(tmp_path / "missing.toml")})
    assert (r.returncode, r.stderr) == (
        1, f"mta: {tmp_path}/missing.toml: cannot read file: [Errno 2] No such file or directory\n")


@pytest.mark.parametrize("args, stdin, message", [
    (["passwd", "remove", "nobody"], None, "mta: etc/users: no such user: nobody\n"),
    (["passwd", "add", "a:b", "--password-stdin"], "x\n", "mta: 'a:b': user name contains ':'\n"),
    (["passwd", "add", "a b", "--password-stdin"], "x\n",
     "mta: 'a b': user name contains white space or control characters\n"),
    (["passwd", "add", "dave", "--password-stdin"], "\n", "mta: empty password\n"),
    (["passwd", "add", "dave", "--password-stdin"], "", "mta: empty password\n"),
    (["passwd", "add", "dave"], None,
     "mta: no terminal to ask for the password: use --password-stdin\n"),
    (["passwd", "list", "--config", "missing.toml"], None,
     "mta: missing.toml: cannot read file: [Errno 2] No such file or directory\n"),
])
def test_errors_are_one_line_with_status_1(site, args, stdin, message):
    r = mta(*args, cwd=site, stdin=stdin)
    assert (r.returncode, r.stderr, r.stdout) == (1, message, "")
    assert not (site / "etc" / "users").exists()


def test_users_file_not_configured(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "mta.toml").write_text("")
    r = mta("passwd", "list", cwd=tmp_path)
    assert (r.returncode, r.stderr) == (1, "mta: etc/mta.toml: [auth] users_file is not set\n")


def test_list_of_missing_file_is_empty(site):
    r = mta("passwd", "list", cwd=site)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_list_warns_about_bad_lines_and_edits_keep_them(site):
    path = site / "etc" / "users"
    path.write_text("# users\nbroken\n")
    r = mta("passwd", "list", cwd=site)
    assert (r.returncode, r.stdout) == (0, "")
    assert r.stderr == "mta: warning: etc/users:2: expected user:hash\n"
    assert mta("passwd", "add", "erin", "--password-stdin", cwd=site, stdin="x\n").returncode == 0
    lines = path.read_text().splitlines()
    assert lines[:2] == ["# users", "broken"] and lines[2].startswith("erin:$scrypt$")


def test_usage_errors_exit_2(site):
    assert mta(cwd=site).returncode == 2
    assert mta("passwd", cwd=site).returncode == 2
    assert mta("passwd", "add", cwd=site).returncode == 2
    r = mta("--help", cwd=site)
    assert r.returncode == 0 and "passwd" in r.stdout
