"""Regenerate requirements-lock.txt: the exact versions `make install` gets.

    .venv/bin/python scripts/lock_requirements.py

Resolves requirements-dev.txt with pip (dry run, so nothing is installed), then prefers for every
package the newest release the machine's local mirror holds that keeps the set consistent: CI then
downloads only the wheels the mirror lacks, which is what keeps an interrupted download from failing
a run. Conflicts are settled by stepping the package pip names down to its next older local release.
"""
import json
import pathlib
import re
import subprocess
import sys
import tempfile

from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]
MIRRORS = (pathlib.Path("/opt/pypi/simple"), pathlib.Path("/opt/pypi-more/simple"))
WHEEL_DIR = pathlib.Path("/opt/wheels")
MAX_ROUNDS = 40


def local_versions(name: str) -> list[Version]:
    """Releases of `name` in the local mirror with a wheel this interpreter can install, newest first."""
    tags = set(sys_tags())
    files = [m.group(1) for root in MIRRORS if (root / name / "index.html").exists()
             for m in re.finditer(r">([^<]+\.whl)<", (root / name / "index.html").read_text())]
    files += [p.name for p in WHEEL_DIR.glob("*.whl")] if WHEEL_DIR.is_dir() else []
    found = set()
    for file in files:
        wheel_name, version, _, wheel_tags = parse_wheel_filename(file)
        if wheel_name == name and wheel_tags & tags:
            found.add(version)
    return sorted(found, reverse=True)


def resolve(constraints: dict[str, Version]) -> tuple[list[dict] | None, str]:
    """pip's resolution of requirements-dev.txt under `constraints`: (packages, "") or (None, pip's error)."""
    with tempfile.TemporaryDirectory() as tmp:
        pins = pathlib.Path(tmp, "pins.txt")
        pins.write_text("".join(f"{n}=={v}\n" for n, v in constraints.items()))
        report = pathlib.Path(tmp, "report.json")
        run = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
             "-r", str(ROOT / "requirements-dev.txt"), "-c", str(pins), "--report", str(report)],
            capture_output=True, text=True)
        if run.returncode != 0:
            return None, run.stdout + run.stderr
        return json.loads(report.read_text())["install"], ""


def main() -> None:
    packages, error = resolve({})
    if packages is None:
        sys.exit(f"lock_requirements: requirements-dev.txt does not resolve:\n{error}")
    candidates: dict[str, list[Version]] = {}
    chosen: dict[str, Version] = {}
    for _ in range(MAX_ROUNDS):
        if packages is not None:
            # Pinning can pull in packages the last resolution lacked: they get their local pick too.
            new = {canonicalize_name(p["metadata"]["name"]) for p in packages} - candidates.keys()
            if not new:
                break
            for name in new:
                candidates[name] = local_versions(name)
                if candidates[name]:
                    chosen[name] = candidates[name][0]
        packages, error = resolve(chosen)
        if packages is not None:
            continue
        blamed = {canonicalize_name(n) for n in re.findall(r"The user requested \(constraint\) ([\w.-]+)==", error)}
        if not blamed:
            sys.exit(f"lock_requirements: pip failed for a reason other than a pinned version:\n{error}")
        for name in blamed:  # step each conflicting package to its next older local release, or unpin it
            older = [v for v in candidates[name] if v < chosen[name]]
            if older:
                chosen[name] = older[0]
            else:
                del chosen[name]
    else:
        sys.exit(f"lock_requirements: no consistent set after {MAX_ROUNDS} rounds:\n{error}")

    lock = ROOT / "requirements-lock.txt"
    # Kept as they are: the comments and the pin of pip itself (pip is not a requirement).
    header = [line for line in lock.read_text().splitlines(keepends=True)
              if line.startswith(("#", "pip=="))]
    pins = sorted(f"{canonicalize_name(p['metadata']['name'])}=={p['metadata']['version']}\n" for p in packages)
    lock.write_text("".join(header + pins))
    remote = [p["metadata"]["name"] for p in packages if not p["download_info"]["url"].startswith("file:")]
    print(f"wrote {lock.name}: {len(pins)} packages, downloaded from the index: {', '.join(remote) or 'none'}")


if __name__ == "__main__":
    main()
