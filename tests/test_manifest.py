"""Tests for job/manifest.py: every mistake in a manifest is a ConfigError before any database is touched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from job.errors import ConfigError
from job.manifest import load_manifest, parse_manifest
from job.services import discover
from tests.support import PROJECT, REPO, SERVICES_DIR, write_manifest

SERVICES = frozenset(discover(SERVICES_DIR))
INSTANCE = f"{PROJECT}:us-central1:fp-settlement-db"
OTHER_INSTANCE = f"{PROJECT}:europe-west1:fp-settlement-eu"
PASSWORD_REF = f"secretmanager://projects/{PROJECT}/secrets/settlement-db-password/versions/latest"
ENVIRONMENTS = sorted((REPO / "deploy" / "environments").glob("*.toml"))


def entry(**overrides: Any) -> dict[str, Any]:
    """Return a valid socket entry for settlement, with keys replaced (None drops a key)."""
    base: dict[str, Any] = {
        "service": "settlement",
        "database": "settlement",
        "instance": INSTANCE,
        "user": "settlement_migrator",
        "password": PASSWORD_REF,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def config_error(path: Path, databases: list[dict[str, Any]], **top: Any) -> ConfigError:
    """Write a manifest, load it, and return the ConfigError it must raise."""
    write_manifest(path, databases, **top)
    with pytest.raises(ConfigError) as info:
        load_manifest(path, SERVICES)
    assert info.value.kind == "config"  # the exit-2 class
    assert str(path) in info.value.message, "the message must name the file"
    return info.value


def test_services_under_test_exist() -> None:
    """The manifests below name the shipped services; without them every test would be meaningless."""
    assert {"settlement", "risk-engine", "compliance"} <= SERVICES


def test_valid_manifest_keeps_file_order(tmp_path: Path) -> None:
    """Order in the file is the order of upgrade, whatever the kind of connection of each entry."""
    path = write_manifest(
        tmp_path / "env.toml",
        [
            entry(service="risk-engine", database="risk_engine"),
            entry(service="compliance", database="compliance", instance=None, host="127.0.0.1", port=6543),
            entry(database="settlement", instance=None, user=None, password=None, url="env://DB_URL"),
        ],
        project=PROJECT,
        socket_dir="/run/cloudsql",
        allow_downgrade=False,
    )

    manifest = load_manifest(path, SERVICES)

    assert [(e.service, e.database) for e in manifest.databases] == [
        ("risk-engine", "risk_engine"),
        ("compliance", "compliance"),
        ("settlement", "settlement"),
    ]
    socket, tcp, url = manifest.databases
    assert socket.instance == INSTANCE and socket.host is None and socket.location == INSTANCE
    assert tcp.host == "127.0.0.1" and tcp.port == 6543 and tcp.location == "127.0.0.1:6543"
    assert url.url == "env://DB_URL" and url.user is None and url.instance is None
    assert manifest.project == PROJECT
    assert manifest.socket_dir == Path("/run/cloudsql")
    assert manifest.allow_downgrade is False
    assert manifest.path == path


def test_defaults(tmp_path: Path) -> None:
    """A minimal manifest gets Cloud SQL's socket root, port 5432 and downgrades allowed."""
    manifest = load_manifest(write_manifest(tmp_path / "env.toml", [entry()]), SERVICES)

    assert manifest.socket_dir == Path("/cloudsql")
    assert manifest.allow_downgrade is True
    assert manifest.project is None
    assert manifest.databases[0].port == 5432
    assert manifest.databases[0].label == "settlement/settlement"


def test_same_database_name_on_two_instances_is_allowed(tmp_path: Path) -> None:
    """A database name is unique per server, not globally: regional copies share the name."""
    path = write_manifest(tmp_path / "env.toml", [entry(), entry(instance=OTHER_INSTANCE)])

    manifest = load_manifest(path, SERVICES)

    assert [e.instance for e in manifest.databases] == [INSTANCE, OTHER_INSTANCE]


def test_several_databases_of_one_service_are_allowed(tmp_path: Path) -> None:
    """Tenants and shards share one schema history: one service, many databases."""
    tenants = [entry(database=f"settlement_tenant_{n}") for n in range(3)]

    manifest = load_manifest(write_manifest(tmp_path / "env.toml", tenants), SERVICES)

    assert [e.database for e in manifest.databases] == [
        "settlement_tenant_0",
        "settlement_tenant_1",
        "settlement_tenant_2",
    ]
    assert {e.service for e in manifest.databases} == {"settlement"}


def test_short_reference_uses_the_manifest_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`secretmanager://S` takes the manifest's project before GOOGLE_CLOUD_PROJECT and `latest`."""
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "somewhere-else")
    path = write_manifest(tmp_path / "env.toml", [entry(password="secretmanager://pw")], project=PROJECT)

    manifest = load_manifest(path, SERVICES)

    ref = manifest.reference(manifest.databases[0].password or "")
    assert ref.location == f"projects/{PROJECT}/secrets/pw/versions/latest"


def test_parse_manifest_names_the_given_path() -> None:
    """Already-parsed data (from a test or a tool) is validated the same way and names its origin."""
    origin = Path("/somewhere/dev.toml")
    manifest = parse_manifest({"databases": [entry()]}, SERVICES, path=origin)
    assert manifest.path == origin

    with pytest.raises(ConfigError) as info:
        parse_manifest({"databases": [entry(service="billing")]}, SERVICES, path=origin)
    assert str(origin) in info.value.message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    """A typo at the top (`socketdir`) must not silently fall back to the default socket root."""
    error = config_error(tmp_path / "env.toml", [entry()], socketdir="/cloudsql")

    assert "socketdir: unknown key" in error.message


def test_path_is_not_a_manifest_key(tmp_path: Path) -> None:
    """`path` is where the file was read from; written in the file it is an unknown key, not ignored."""
    path = write_manifest(tmp_path / "env.toml", [entry()])
    path.write_text('path = "/elsewhere.toml"\n' + path.read_text(encoding="utf-8"), encoding="utf-8")

    with pytest.raises(ConfigError) as info:
        load_manifest(path, SERVICES)

    assert str(path) in info.value.message
    assert "path: unknown key" in info.value.message


def test_unknown_entry_key_names_its_path(tmp_path: Path) -> None:
    """A misspelt `passwrd` must point at the exact entry and key, not just "invalid manifest"."""
    good = entry(database="first")
    typo = entry(database="second", password=None)
    typo["passwrd"] = PASSWORD_REF

    error = config_error(tmp_path / "env.toml", [good, typo])

    assert "databases[1].passwrd: unknown key" in error.message


def test_missing_service_lists_known_services(tmp_path: Path) -> None:
    """A service the image does not ship is caught up front, with the names that do exist."""
    error = config_error(tmp_path / "env.toml", [entry(), entry(service="billing", database="billing")])

    assert "databases[1]" in error.message
    assert "'billing'" in error.message
    assert error.hint is not None
    for name in ("compliance", "risk-engine", "settlement"):
        assert name in error.hint
    assert error.service == "billing"


def test_two_entries_for_one_database_on_one_instance(tmp_path: Path) -> None:
    """Upgrading one database twice in a run is always a copy-paste mistake."""
    error = config_error(
        tmp_path / "env.toml", [entry(), entry(service="risk-engine", database="risk"), entry()]
    )

    assert "databases[2]" in error.message
    assert "databases[0]" in error.message
    assert "'settlement'" in error.message
    assert INSTANCE in error.message


def test_two_entries_for_one_database_on_one_host(tmp_path: Path) -> None:
    """The duplicate check also applies to TCP entries (same host and port)."""
    tcp = entry(instance=None, host="db.internal", port=5433)

    error = config_error(tmp_path / "env.toml", [tcp, tcp])

    assert "databases[1]" in error.message
    assert "db.internal:5433" in error.message


def test_url_with_user_and_password(tmp_path: Path) -> None:
    """A whole URL already carries the login: giving both is ambiguous, so it is refused."""
    error = config_error(tmp_path / "env.toml", [entry(instance=None, url="env://DB_URL")])

    assert "databases[0]" in error.message
    assert "url excludes user, password" in error.message


def test_neither_instance_nor_host(tmp_path: Path) -> None:
    """An entry without a place to connect to cannot be reached."""
    error = config_error(tmp_path / "env.toml", [entry(instance=None)])

    assert "databases[0]" in error.message
    assert "exactly one of instance" in error.message


def test_both_instance_and_host(tmp_path: Path) -> None:
    """Socket and TCP at once would leave it to chance which server is migrated."""
    error = config_error(tmp_path / "env.toml", [entry(host="127.0.0.1")])

    assert "databases[0]" in error.message
    assert "exactly one of instance" in error.message


def test_missing_password(tmp_path: Path) -> None:
    """Without url, user and password are both required (Cloud SQL refuses passwordless logins)."""
    error = config_error(tmp_path / "env.toml", [entry(password=None)])

    assert "databases[0]" in error.message
    assert "missing password" in error.message


@pytest.mark.parametrize(
    "instance",
    [
        "fp-settlement-db",  # a bare name: no project or region
        "us-central1:fp-settlement-db",  # no project
        f"{PROJECT}/us-central1/fp-settlement-db",  # slashes would escape the socket directory
        f"{PROJECT}:us-central1:FP_DB",  # Cloud SQL names are lower case with hyphens
    ],
)
def test_malformed_instance_name(tmp_path: Path, instance: str) -> None:
    """The instance becomes a path under the socket root, so only PROJECT:REGION:NAME is accepted."""
    error = config_error(tmp_path / "env.toml", [entry(instance=instance)])

    assert "databases[0].instance" in error.message


def test_domain_scoped_instance_name_is_accepted(tmp_path: Path) -> None:
    """Legacy domain-scoped projects (`example.com:proj`) have a four-part connection name."""
    instance = "example.com:fp-test:us-central1:fp-settlement-db"

    manifest = load_manifest(write_manifest(tmp_path / "env.toml", [entry(instance=instance)]), SERVICES)

    assert manifest.databases[0].instance == instance


@pytest.mark.parametrize(
    ("reference", "says"),
    [
        ("secretmanager://projects/x/secrets/", "bad secret reference secretmanager://projects/x/secrets/"),
        ("vault://x", "scheme is unknown"),
        ("env://1BAD", "bad secret reference env://1BAD"),
        ("file://relative", "the path must be absolute"),
    ],
)
def test_bad_secret_reference(tmp_path: Path, reference: str, says: str) -> None:
    """A malformed reference fails at load time, naming the entry and key, not when it is read."""
    error = config_error(tmp_path / "env.toml", [entry(), entry(database="other", password=reference)])

    assert "databases[1].password" in error.message
    assert says in error.message
    assert error.database == "other"


def test_bad_url_reference(tmp_path: Path) -> None:
    """The url key is a secret reference too, and is checked the same way."""
    bad = entry(instance=None, user=None, password=None, url="vault://db-url")

    error = config_error(tmp_path / "env.toml", [bad])

    assert "databases[0].url" in error.message


def test_short_reference_without_any_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`secretmanager://S` needs a project from the manifest or GOOGLE_CLOUD_PROJECT; neither is an error."""
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)

    error = config_error(tmp_path / "env.toml", [entry(password="secretmanager://settlement-db-password")])

    assert "databases[0].password" in error.message
    assert "names no project" in error.message
    assert error.hint is not None and "GOOGLE_CLOUD_PROJECT" in error.hint


def test_short_reference_with_google_cloud_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a manifest project, GOOGLE_CLOUD_PROJECT completes a short reference."""
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", PROJECT)
    path = write_manifest(tmp_path / "env.toml", [entry(password="secretmanager://pw")])

    manifest = load_manifest(path, SERVICES)

    ref = manifest.reference("secretmanager://pw")
    assert ref.location == f"projects/{PROJECT}/secrets/pw/versions/latest"


def test_no_databases(tmp_path: Path) -> None:
    """A manifest that migrates nothing is a mistake (wrong file), not a silent success."""
    path = tmp_path / "env.toml"
    path.write_text(f'project = "{PROJECT}"\n', encoding="utf-8")

    with pytest.raises(ConfigError) as info:
        load_manifest(path, SERVICES)

    assert "databases" in info.value.message


def test_not_toml(tmp_path: Path) -> None:
    """A syntax error is reported as a configuration error that names the file."""
    path = tmp_path / "env.toml"
    path.write_text("[[databases]\nservice = settlement\n", encoding="utf-8")

    with pytest.raises(ConfigError) as info:
        load_manifest(path, SERVICES)

    assert str(path) in info.value.message
    assert "not valid TOML" in info.value.message


def test_missing_file_hints_at_migrate_env(tmp_path: Path) -> None:
    """A wrong MIGRATE_ENV shows up as a missing file; the hint says which settings choose it."""
    path = tmp_path / "staging.toml"

    with pytest.raises(ConfigError) as info:
        load_manifest(path, SERVICES)

    assert str(path) in info.value.message
    assert "not found" in info.value.message
    assert info.value.hint is not None and "MIGRATE_ENV" in info.value.hint


def test_environment_manifests_exist() -> None:
    """The image ships at least one environment manifest, or the job has nothing to run."""
    assert ENVIRONMENTS, "no deploy/environments/*.toml"


@pytest.mark.parametrize("path", ENVIRONMENTS, ids=[p.stem for p in ENVIRONMENTS])
def test_environment_manifest_loads(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each shipped manifest is valid against the shipped services, without GOOGLE_CLOUD_PROJECT
    (Cloud Run does not set it, so short references must take the manifest's project)."""
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)

    manifest = load_manifest(path, discover(SERVICES_DIR))

    assert manifest.databases
    if path.stem != "local":  # literals are for local work only (DESIGN.md, Secret references)
        literal = [
            f"{db.label}.{key}"
            for db in manifest.databases
            for key in ("password", "url")
            if getattr(db, key) and manifest.reference(getattr(db, key)).scheme == "literal"
        ]
        assert not literal, f"{path.name} holds literal secrets: {literal}"


# --- auth = "iam" and owner ----------------------------------------------------------------------


def iam_entry(**overrides: Any) -> dict[str, Any]:
    """Return a valid IAM entry for settlement (no user, no password), with keys replaced."""
    return entry(**{"auth": "iam", "user": None, "password": None, **overrides})


def test_iam_entry_needs_no_user_or_password_and_takes_an_owner(tmp_path: Path) -> None:
    """An IAM entry logs in as the job's identity: no secret to name; the owner is a role name."""
    path = write_manifest(
        tmp_path / "env.toml",
        [
            iam_entry(owner="settlement_owner"),
            iam_entry(service="compliance", database="compliance", user="alice@example.com"),
            iam_entry(service="risk-engine", database=None, discover="SELECT 'risk_engine'", owner="risk"),
        ],
    )

    listed, named, discovered = load_manifest(path, SERVICES).databases

    assert (listed.auth, listed.user, listed.password, listed.owner) == (
        "iam",
        None,
        None,
        "settlement_owner",
    )
    assert named.user == "alice@example.com" and named.owner is None
    assert discovered.auth == "iam" and discovered.discover is not None


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"password": PASSWORD_REF}, 'auth = "iam" logs in with a token, so it excludes password'),
        (
            {"instance": None, "url": "env://DB_URL"},
            'auth = "iam" logs in with a token, so it excludes url',
        ),
        ({"user": "secretmanager://db-user"}, "user is the IAM database user's name itself"),
        ({"instance": None}, "give exactly one of instance (Cloud SQL socket) or host (TCP)"),
        ({"auth": "token"}, "databases[0].auth: Input should be 'password' or 'iam'"),
        ({"owner": "owner; DROP TABLE x"}, "databases[0].owner: String should match pattern"),
    ],
)
def test_bad_iam_entry(tmp_path: Path, overrides: dict[str, Any], says: str) -> None:
    """Each mistake in an IAM entry is exit 2 with a sentence saying what to change."""
    error = config_error(tmp_path / "env.toml", [iam_entry(**overrides)], project=PROJECT)
    assert says in error.message, error.message


def test_owner_applies_to_password_logins_too(tmp_path: Path) -> None:
    """owner is not tied to IAM: any login may act as the role that owns the schema."""
    path = write_manifest(tmp_path / "env.toml", [entry(owner="settlement_owner")])
    assert load_manifest(path, SERVICES).databases[0].owner == "settlement_owner"
