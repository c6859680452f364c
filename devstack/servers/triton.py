"""A real Triton Inference Server 2.51 on loopback, run from the ``nvidia-pytriton`` wheel.

No Docker and no GPU: the wheel ships the ``tritonserver`` binary, its libraries, the Python
backend and one backend stub per Python version. ``TritonServer`` assembles, in a work folder,

- ``backends/python/``: ``libtriton_python.so``, ``triton_python_backend_utils.py`` and the stub
  for the running Python;
- ``models/<name>/config.pbtxt`` rendered from ``stages/heavy/config.pbtxt.template``, and
  ``models/<name>/<version>/`` holding ``model.py`` (``stages/heavy/triton_model``) and
  ``model.onnx`` (a symlink to the artifact);

then starts ``tritonserver`` with ``LD_LIBRARY_PATH`` = wheel libs + this Python's ``LIBDIR`` (else
the stub loads the system's libpython and fails) and ``PYTHONPATH`` = this environment's
site-packages (so ``model.py`` imports onnxruntime), and waits until the server is live and
ready and the model is ready.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import string
import sys
import sysconfig
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import onnxruntime as ort

from devstack.servers._errors import ServerBinaryNotFoundError, ServerError
from devstack.servers._process import LOOPBACK, ManagedProcess, StartStop, http_ok, resolve_port

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME: Final = "fraud_heavy"
INPUT_NAME: Final = "sequence"
OUTPUT_NAME: Final = "score"
HEAVY_STAGE_DIR: Final = Path(__file__).resolve().parent.parent.parent / "stages" / "heavy"
CONFIG_TEMPLATE: Final = HEAVY_STAGE_DIR / "config.pbtxt.template"
MODEL_PY: Final = HEAVY_STAGE_DIR / "triton_model" / "model.py"


class ModelContractError(ServerError):
    """The ONNX file does not have the heavy stage's tensor contract."""


@dataclass(frozen=True, slots=True)
class HeavyModelShape:
    """Per-item input shape of a heavy-stage ONNX file: ``sequence`` is [N, seq_len, token_dim]."""

    seq_len: int
    token_dim: int


def read_model_shape(onnx_path: Path) -> HeavyModelShape:
    """Read ``seq_len`` and ``token_dim`` from the ONNX file and check the tensor names.

    Raises:
        ModelContractError: no ``sequence`` input of rank 3 with static inner dims, or no ``score``.
    """
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
        raise ModelContractError(
            f"{onnx_path}: needs input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
            f"has inputs {sorted(inputs)} and outputs {sorted(outputs)}"
        )
    shape = list(inputs[INPUT_NAME].shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        raise ModelContractError(
            f"{onnx_path}: input {INPUT_NAME!r} must be [batch, seq_len, token_dim] with static "
            f"seq_len and token_dim, got {shape}"
        )
    return HeavyModelShape(seq_len=int(shape[1]), token_dim=int(shape[2]))


def render_model_config(
    template: str,
    *,
    model_name: str,
    shape: HeavyModelShape,
    max_batch_size: int = 64,
    max_queue_delay_us: int = 0,
    instance_count: int = 1,
    delay_ms: float = 0.0,
    intra_op_threads: int = 1,
) -> str:
    """Fill the local ``config.pbtxt`` template (pure: no files read or written).

    ``max_queue_delay_us`` defaults to 0: the dynamic batcher then sends a request to an idle
    instance at once and still batches whatever queued while the instance was busy. A window
    makes every lone escalation wait it out, and the orchestrator already merges concurrent
    escalations into one request (:mod:`orchestrator.coalescing`); on one CPU instance a window
    buys no batch that the busy instance would not have formed anyway."""
    return string.Template(template).substitute(
        model_name=model_name,
        max_batch_size=max_batch_size,
        seq_len=shape.seq_len,
        token_dim=shape.token_dim,
        max_queue_delay_us=max_queue_delay_us,
        instance_count=instance_count,
        delay_ms=repr(float(delay_ms)),
        intra_op_threads=intra_op_threads,
    )


def _pytriton_dir() -> Path:
    try:
        import pytriton
    except ImportError as exc:
        raise ServerBinaryNotFoundError(
            "nvidia-pytriton is not installed; install the servers extra "
            "(pip install 'fraud-cascade[servers]')"
        ) from exc
    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def _pytriton_libs_dir(tritonserver_dir: Path) -> Path:
    # auditwheel puts the bundled libraries beside the package: site-packages/nvidia_pytriton.libs
    return tritonserver_dir.parent.parent / "nvidia_pytriton.libs"


def build_python_backend(backends_dir: Path) -> Path:
    """Create ``backends_dir/python`` with the Python backend and the stub for this Python."""
    dist = _pytriton_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    sources = [
        dist / "backends" / "python" / "libtriton_python.so",
        dist / "backends" / "python" / "triton_python_backend_utils.py",
        stub,
    ]
    for source in sources:
        if not source.is_file():
            raise ServerBinaryNotFoundError(f"{source} missing from the nvidia-pytriton wheel")
    target = backends_dir / "python"
    target.mkdir(parents=True, exist_ok=True)
    for source in sources:
        # Copies, not symlinks: the backend locates the stub relative to its own real path.
        shutil.copy2(source, target / source.name)
    return backends_dir


def build_model_repository(
    repository: Path,
    onnx_path: Path,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    model_version: int = 1,
    max_batch_size: int = 64,
    max_queue_delay_us: int = 0,
    instance_count: int = 1,
    delay_ms: float = 0.0,
    intra_op_threads: int = 1,
    extra_versions: Mapping[int, Path] | None = None,
) -> Path:
    """Lay out ``<name>/config.pbtxt`` and ``<name>/<version>/{model.py,model.onnx}``, and a
    version folder for each of ``extra_versions`` (Triton version -> ONNX file; same tensors)."""
    shape = read_model_shape(onnx_path)
    model_dir = repository / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    config = render_model_config(
        CONFIG_TEMPLATE.read_text(),
        model_name=model_name,
        shape=shape,
        max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us,
        instance_count=instance_count,
        delay_ms=delay_ms,
        intra_op_threads=intra_op_threads,
    )
    (model_dir / "config.pbtxt").write_text(config)
    versions = {model_version: onnx_path, **(extra_versions or {})}
    for version, path in versions.items():
        if read_model_shape(path) != shape:
            raise ValueError(f"{path} (version {version}) does not have {onnx_path}'s shape")
        version_dir = model_dir / str(version)
        version_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(MODEL_PY, version_dir / "model.py")
        link = version_dir / "model.onnx"
        link.unlink(missing_ok=True)
        link.symlink_to(path.resolve())
    return repository


def _site_packages() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def triton_environment(tritonserver_dir: Path) -> dict[str, str]:
    """Environment for ``tritonserver``: wheel libs + Python LIBDIR, site-packages on PYTHONPATH."""
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR")
    ld_path = [str(_pytriton_libs_dir(tritonserver_dir))]
    if libdir:
        ld_path.append(str(libdir))
    if env.get("LD_LIBRARY_PATH"):
        ld_path.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(ld_path)
    # The stub embeds Python with an isolated config (PYTHONPATH alone is not enough): it finds its
    # prefix through the `python3` first on PATH, so this environment's bin/ goes first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    python_path = _site_packages()
    if env.get("PYTHONPATH"):
        python_path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(python_path)
    return env


def _remove_shm(prefix: str, shm_dir: Path = Path("/dev/shm")) -> None:
    """Remove shared-memory regions named ``prefix*`` (a killed server cannot clean up)."""
    for path in shm_dir.glob(f"{prefix}*"):
        path.unlink(missing_ok=True)


class TritonServer(StartStop):
    """Triton (from the ``nvidia-pytriton`` wheel) serving the heavy model on 127.0.0.1.

    Give the ONNX artifact and how to name it; ports 0 pick free ones. ``delay_ms`` makes every
    batch sleep that long (to test stage-2 timeouts). On entry the model repository is built in
    ``work_dir`` (a temporary folder, removed on exit, when not given) and the server started; entry
    returns once the server is live and ready and the model is ready.

    Example::

        async with TritonServer(onnx_path, log_dir=tmp) as triton:
            client = tritonclient.grpc.aio.InferenceServerClient(triton.grpc_url)
    """

    def __init__(
        self,
        onnx_path: Path,
        *,
        model_name: str = DEFAULT_MODEL_NAME,
        model_version: int = 1,
        grpc_port: int = 0,
        http_port: int = 0,
        metrics_port: int = 0,
        work_dir: Path | None = None,
        log_dir: Path | None = None,
        delay_ms: float = 0.0,
        instance_count: int = 1,
        intra_op_threads: int = 1,
        max_batch_size: int = 64,
        max_queue_delay_us: int = 0,
        start_timeout_s: float = 120.0,
        stop_grace_s: float = 15.0,
        trace_url: str | None = None,
        extra_versions: Mapping[int, Path] | None = None,
    ) -> None:
        if model_version < 1:
            raise ValueError(f"model_version must be >= 1, got {model_version}")
        if instance_count < 1 or intra_op_threads < 1 or max_batch_size < 1:
            raise ValueError("instance_count, intra_op_threads and max_batch_size must be >= 1")
        if max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
        if delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {delay_ms}")
        if not onnx_path.is_file():
            raise FileNotFoundError(f"ONNX model {onnx_path} does not exist")
        self.host: Final = LOOPBACK
        self.onnx_path: Final = onnx_path
        self.model_name: Final = model_name
        self.model_version: Final = model_version
        self.extra_versions: Final = dict(extra_versions or {})
        """More versions of the model served beside ``model_version`` (a canary, a rollback)."""
        self.grpc_port: Final = resolve_port(grpc_port)
        self.http_port: Final = resolve_port(http_port)
        self.metrics_port: Final = resolve_port(metrics_port)
        self.delay_ms: Final = delay_ms
        self.instance_count: Final = instance_count
        self.intra_op_threads: Final = intra_op_threads
        self.max_batch_size: Final = max_batch_size
        self.max_queue_delay_us: Final = max_queue_delay_us
        """The dynamic batcher's window (:func:`render_model_config` says why 0)."""
        self._own_work_dir = work_dir is None
        self.work_dir: Final = work_dir or Path(tempfile.mkdtemp(prefix="cascade-triton-"))
        self._log_dir = log_dir or self.work_dir
        self._start_timeout_s = start_timeout_s
        self._stop_grace_s = stop_grace_s
        self.trace_url: Final = trace_url
        """OTLP/HTTP traces URL: with it Triton traces every request in OpenTelemetry mode,
        continuing the caller's W3C ``traceparent`` from the gRPC metadata."""
        self.process: ManagedProcess | None = None
        self._shm_prefix = ""
        self._tritonserver_dir: Path | None = None
        self._backends_dir: Path | None = None

    @property
    def grpc_url(self) -> str:
        """``127.0.0.1:PORT``, the form ``tritonclient.grpc`` takes."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """``http://127.0.0.1:PORT`` (KServe v2 HTTP API)."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """``http://127.0.0.1:PORT/metrics``, Triton's Prometheus endpoint."""
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def repository_dir(self) -> Path:
        """The model repository this server serves."""
        return self.work_dir / "models"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self.process.pid if self.process is not None else None

    async def ready(self) -> bool:
        """True when the server is live and ready and the model is ready (HTTP health API)."""
        if not (
            await http_ok(f"{self.http_url}/v2/health/live")
            and await http_ok(f"{self.http_url}/v2/health/ready")
        ):
            return False
        for version in (self.model_version, *self.extra_versions):
            model = f"{self.http_url}/v2/models/{self.model_name}/versions/{version}/ready"
            if not await http_ok(model):
                return False
        return True

    def _argv(self, tritonserver_dir: Path, backends_dir: Path) -> list[str]:
        return [
            str(tritonserver_dir / "bin" / "tritonserver"),
            f"--model-repository={self.repository_dir}",
            f"--backend-directory={backends_dir}",
            f"--cache-directory={tritonserver_dir / 'caches'}",
            f"--grpc-address={LOOPBACK}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={LOOPBACK}",
            f"--http-port={self.http_port}",
            f"--metrics-address={LOOPBACK}",
            f"--metrics-port={self.metrics_port}",
            "--allow-grpc=true",
            "--allow-http=true",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={max(1, int(self._stop_grace_s) - 2)}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            *self._trace_args(),
        ]

    def _trace_args(self) -> list[str]:
        if self.trace_url is None:
            return []
        return [
            "--trace-config=mode=opentelemetry",
            "--trace-config=rate=1",
            "--trace-config=level=TIMESTAMPS",
            f"--trace-config=opentelemetry,url={self.trace_url}",
            "--trace-config=opentelemetry,resource=service.name=triton",
            # Export every 200 ms (the default, 5 s, loses the last spans of a short run).
            "--trace-config=opentelemetry,bsp_schedule_delay=200",
        ]

    async def start(self) -> None:
        """Build the backend and model repository, start Triton, wait until the model is ready."""
        if self.process is not None:
            raise RuntimeError("this TritonServer was already started")
        try:
            tritonserver_dir = _pytriton_dir()
            backends_dir = build_python_backend(self.work_dir / "backends")
            # A reused work_dir may hold another model from an earlier run: Triton would load it.
            shutil.rmtree(self.repository_dir, ignore_errors=True)
            build_model_repository(
                self.repository_dir,
                self.onnx_path,
                model_name=self.model_name,
                model_version=self.model_version,
                max_batch_size=self.max_batch_size,
                max_queue_delay_us=self.max_queue_delay_us,
                instance_count=self.instance_count,
                delay_ms=self.delay_ms,
                intra_op_threads=self.intra_op_threads,
                extra_versions=self.extra_versions,
            )
            self._tritonserver_dir, self._backends_dir = tritonserver_dir, backends_dir
            self.process = self._new_process()
            await self.process.start()
        except BaseException:
            self._remove_work_dir(failed=True)
            raise

    def _new_process(self) -> ManagedProcess:
        assert self._tritonserver_dir is not None
        assert self._backends_dir is not None
        # A unique shared-memory prefix per start, so several servers on one machine never
        # collide, nor does a restarted server with what a killed one left in /dev/shm.
        self._shm_prefix = f"cascade-{os.getpid()}-{secrets.token_hex(4)}-"
        return ManagedProcess(
            f"triton-{self.grpc_port}",
            self._argv(self._tritonserver_dir, self._backends_dir),
            log_dir=self._log_dir,
            env=triton_environment(self._tritonserver_dir),
            cwd=self.work_dir,
            probe=self.ready,
            ports=(self.grpc_port, self.http_port, self.metrics_port),
            start_timeout_s=self._start_timeout_s,
            probe_interval_s=0.1,
            stop_grace_s=self._stop_grace_s,
        )

    @property
    def name(self) -> str:
        """The process's name in logs (``triton-GRPC_PORT``)."""
        return f"triton-{self.grpc_port}"

    @property
    def stopping(self) -> bool:
        """True once stopped on purpose."""
        return self.process is not None and self.process.stopping

    async def wait(self) -> int:
        """Wait until the current Triton process exits; its exit status."""
        if self.process is None:
            raise RuntimeError("this TritonServer was not started")
        return await self.process.wait()

    async def restart(self) -> None:
        """Start Triton again after its process exited: same ports and model repository, a fresh
        shared-memory prefix (the killed server's regions are removed); wait until ready."""
        old = self.process
        if old is None or old.stopping:
            raise RuntimeError("this TritonServer was not started, or was stopped on purpose")
        if old.running:
            raise RuntimeError(f"{old.name} is still running")
        await old.stop()  # reaps what is left of its process group (the backend stubs)
        _remove_shm(self._shm_prefix)
        self.process = self._new_process()
        await self.process.start()

    async def stop(self) -> None:
        """Stop Triton (SIGTERM, SIGKILL after a grace period), reap it, remove a temp work_dir."""
        try:
            if self.process is not None:
                await self.process.stop()
        finally:
            if self._shm_prefix:
                _remove_shm(self._shm_prefix)
            self._remove_work_dir(failed=False)

    def _remove_work_dir(self, *, failed: bool) -> None:
        # A failed start keeps a temporary folder that holds the log: the log is the evidence.
        if self._own_work_dir and not (failed and self._log_dir == self.work_dir):
            shutil.rmtree(self.work_dir, ignore_errors=True)
