"""The pure parts of ``make image-test``: where the stand-in's packages come from, the limits
podman gets, and what the hygiene scan counts as a secret. The image itself is proven by running
``make image-test`` (after ``make test`` in .ci/run), not here."""

from __future__ import annotations

import hashlib
import io
import resource
import tarfile
from pathlib import Path

import pytest

from devtools import image_hygiene, podman, standin
from devtools.cloudrun_sim import Outcome
from devtools.image_runs import json_problems

KEY = (
    b"-----BEGIN PRIVATE KEY-----\n"
    b"MC4CAQAwBQYDK2VwBCIEIKz3cQ0E6v2bW4wq0cT1H0m2m4pX2g2xQ0J7wq8vR5nU\n"
    b"-----END PRIVATE KEY-----\n"
)


def test_the_mirror_comes_from_deb822_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    assert standin.apt_mirror(tmp_path) == "http://mirror.example/debian"


def test_the_mirror_comes_from_one_line_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# deb http://old.example/debian bookworm main\n"
        "deb [signed-by=/k.gpg] http://mirror.example/debian bookworm main\n"
    )
    assert standin.apt_mirror(tmp_path) == "http://mirror.example/debian"


def test_no_bookworm_source_says_so(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    with pytest.raises(podman.PodmanError, match="no apt source for Debian bookworm"):
        standin.apt_mirror(tmp_path)


def test_a_change_in_what_the_stand_in_is_made_from_changes_its_name() -> None:
    one = standin.Source("http://a/debian", {"ca.crt": "1"}, {"python3": "3.11.2-1"})
    assert one.tag() == standin.Source("http://a/debian", {"ca.crt": "1"}, {"python3": "3.11.2-1"}).tag()
    assert one.tag() != standin.Source("http://a/debian", {"ca.crt": "2"}, {"python3": "3.11.2-1"}).tag()
    assert one.tag() != standin.Source("http://a/debian", {"ca.crt": "1"}, {"python3": "3.11.2-2"}).tag()


def test_container_ulimits_stay_within_the_hard_limits() -> None:
    hard_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = next(u for u in podman.ulimits() if u.startswith("nofile="))
    soft, hard = (int(x) for x in nofile.removeprefix("nofile=").split(":"))
    assert soft <= hard
    assert hard_nofile == resource.RLIM_INFINITY or hard <= hard_nofile


def test_the_podman_configuration_names_runc_and_cgroupfs() -> None:
    conf = podman.config_files()["containers.conf"]
    assert 'runtime = "runc"' in conf
    assert 'cgroup_manager = "cgroupfs"' in conf


def layer(tmp_path: Path, files: dict[str, bytes]) -> Path:
    """Write a layer tar holding the given files."""
    path = tmp_path / f"layer{len(list(tmp_path.iterdir()))}.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_private_key_in_a_deleted_file_of_an_earlier_layer_is_found(tmp_path: Path) -> None:
    first = layer(tmp_path, {"app/deploy/notes.txt": KEY, "app/ok.py": b"x = 1\n"})
    second = layer(tmp_path, {"app/deploy/.wh.notes.txt": b""})
    scan = image_hygiene.scan_layers([first, second], [])
    assert scan.findings == {"secret (a private key)": ["layer 1: /app/deploy/notes.txt"]}


def test_key_names_are_credentials_among_the_jobs_files_but_not_in_the_system(tmp_path: Path) -> None:
    # A base image has public .pem certificates and .gpg keyrings; the job's files have no reason to.
    files = {
        "app/services/s/.env.prod": b"x",
        "app/deploy/environments/tls.key": b"x",
        "app/services/s/prod-sa-key.json": b"{}",
        "etc/ssl/certs/ca.pem": b"x",
        "app/.venv/lib/python3.11/site-packages/certifi/cacert.pem": b"x",
        "usr/share/keyrings/debian.gpg": b"x",
        "etc/app/.env": b"x",
    }
    scan = image_hygiene.scan_layers([layer(tmp_path, files)], [])
    assert sorted(scan.findings["credential file"]) == [
        "layer 1: /app/deploy/environments/tls.key",
        "layer 1: /app/services/s/.env.prod",
        "layer 1: /app/services/s/prod-sa-key.json",
        "layer 1: /etc/app/.env",
    ]


def test_the_marker_strings_of_key_parsers_are_not_keys(tmp_path: Path) -> None:
    parser = b'PEM_MARKER = b"-----BEGIN RSA PRIVATE KEY-----"\nEND = b"-----END RSA PRIVATE KEY-----"\n'
    scan = image_hygiene.scan_layers([layer(tmp_path, {"app/lib/ssh.py": parser})], [])
    assert scan.findings == {}


def test_a_key_shipped_unchanged_by_a_debian_package_is_exempted(tmp_path: Path) -> None:
    digest = hashlib.md5(KEY).hexdigest()
    base = layer(
        tmp_path,
        {
            "usr/lib/libselftest.so": KEY,
            "var/lib/dpkg/info/libselftest.md5sums": f"{digest}  usr/lib/libselftest.so\n".encode(),
            "usr/lib/libchanged.so": KEY + b"!",
            "var/lib/dpkg/info/libchanged.md5sums": f"{digest}  usr/lib/libchanged.so\n".encode(),
        },
    )
    scan = image_hygiene.scan_layers([base], [])
    assert scan.findings == {"secret (a private key)": ["layer 1: /usr/lib/libchanged.so"]}
    assert len(scan.exempted) == 1


def test_git_caches_compilers_credentials_and_test_passwords_are_found(tmp_path: Path) -> None:
    files = {
        "app/.git/HEAD": b"ref: refs/heads/main\n",
        "root/.cache/pip/http/x": b"x",
        "usr/bin/x86_64-linux-gnu-gcc-12": b"\x7fELF",
        "root/.netrc": b"machine x\n",
        "app/job/settings.py": b"password = 'S3cret test pw'\n",
    }
    scan = image_hygiene.scan_layers([layer(tmp_path, files)], ["S3cret test pw"])
    assert set(scan.findings) == {
        ".git",
        "package cache",
        "compiler",
        "credential file",
        "secret (a password used by the tests)",
    }


def test_only_json_objects_on_stdout_and_nothing_on_stderr() -> None:
    good = Outcome(0, '{"event": "run.start"}\n{"event": "run.summary"}\n', "", 1.0)
    assert json_problems(good) == []
    bad = Outcome(1, '{"event": "run.start"}\nTraceback (most recent call last):\n', "warning\n", 1.0)
    assert json_problems(bad) == [
        "stdout line 2 is not a JSON object: Traceback (most recent call last):",
        "stderr is not empty: warning",
    ]
