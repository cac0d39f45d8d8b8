"""`blip2-serve`: run the server on an embedded local Ray (or an existing cluster), write tiny checkpoints, and
(clients/cli.py) caption, ask and chat as a client. Client commands import no server code."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from blip2_serve.clients.contract import DEFAULT_MAX_NEW_TOKENS, MAX_BATCH_SIZE

logger = logging.getLogger("blip2_serve")


def _config_from_args(args: argparse.Namespace):
    """The AppConfig the flags and --config file describe, and the Ray Serve config document when the file is one."""
    from blip2_serve.serve.config import AppConfig
    from blip2_serve.serve.deploy_config import app_config_of, is_serve_config, with_app_config

    document = None
    if getattr(args, "config", None):
        document = AppConfig.read_document(args.config)
        if is_serve_config(document):
            config = app_config_of(document)
        else:
            config, document = AppConfig.model_validate(document), None
    elif args.model:
        config = AppConfig.model_validate({"model": {"checkpoint": args.model}})
    else:
        raise SystemExit(f"blip2-serve {args.command}: give --model CHECKPOINT or --config FILE")
    data: dict[str, Any] = config.model_dump()
    if args.model:
        data["model"]["checkpoint"] = args.model
    for name in ("dtype", "quantization", "device"):
        if getattr(args, name, None):
            data["model"][name] = getattr(args, name)
    if args.host:
        data["server"]["host"] = args.host
    if args.port is not None:
        data["server"]["http_port"] = args.port
    if args.grpc_port is not None:
        data["server"]["grpc_port"] = args.grpc_port if args.grpc_port > 0 else None
    if getattr(args, "api_key_env", None):
        data["server"]["api_key_env"] = args.api_key_env
    autoscale = getattr(args, "autoscale", None)
    if autoscale:
        low, _, high = autoscale.partition(":")
        for stage in ("vision", "llm"):
            data[stage]["autoscaling"] = {
                **(data[stage].get("autoscaling") or {}),
                "min_replicas": int(low),
                "max_replicas": int(high or low),
            }
    config = AppConfig.model_validate(data)
    return config, (with_app_config(document, config) if document is not None else None)


def _resolved(config, document):
    """The config (and Serve document) with every checkpoint a local directory (serve/checkpoints.py)."""
    from blip2_serve.serve.checkpoints import resolve
    from blip2_serve.serve.deploy_config import with_app_config

    update: dict[str, Any] = {"model": resolve(config.model)}
    if config.retrieval is not None:
        update["retrieval"] = config.retrieval.model_copy(update={"model": resolve(config.retrieval.model)})
    config = config.model_copy(update=update)
    return config, (with_app_config(document, config) if document is not None else None)


def _deploy(config, document, proxies: dict | None = None) -> None:
    """Submit the application (a Serve config document the way `serve run FILE` does, else build_app) without
    waiting for it: `_wait_running` waits. `proxies`: serve.start's options where the ingress replica serves the
    config's ports itself (serve/app.prepare_local_ray)."""
    from blip2_serve.serve.app import build_app, serve_options
    from ray import serve

    if document is None:
        serve.start(**(proxies or serve_options(config)), logging_config=_serve_logging())
        target = serve.RunTarget(target=build_app(config), name=config.app_name, route_prefix=config.route_prefix)
        serve.run_many([target], wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
        return
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    if proxies is not None:  # the document's ports are the ingress replica's; Ray's proxies go where they may
        document = {**document, "http_options": {**document.get("http_options", {}), **proxies["http_options"]}}
        if "grpc_options" in proxies:
            grpc = {**document.get("grpc_options", {}), "port": proxies["grpc_options"]["port"]}
            document["grpc_options"] = grpc
    schema = ServeDeploySchema.model_validate(document)
    client = serve_api.serve_start(
        global_logging_config=_serve_logging(),
        http_options=schema.http_options.model_dump(),
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
        proxy_location=schema.proxy_location,
    )
    client.deploy_apps(schema)


def _lines(text: str) -> list[str]:
    """The text's lines that hold something, stripped."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def _causes(status) -> str:
    """An application's failure in a line: its own message, then each failed deployment's last line (a replica's
    constructor error ends its traceback: "Vision: ValueError: Unrecognized processing class in ...")."""
    causes = [status.message.strip()]
    for name, deployment in status.deployments.items():
        lines = _lines(deployment.message or "")
        if lines and str(deployment.status).rsplit(".", 1)[-1] in ("DEPLOY_FAILED", "UNHEALTHY"):
            causes.append(f"{name}: {lines[-1]}")
    return " ".join(c for c in causes if c)


class _Deployment:
    """Deploy and wait until the application runs on a thread of its own, while the main thread watches `stop`,
    which the signal handlers set: a signal is acted on at once, wherever Ray's calls wait (seen in CI: SIGINT not
    acted on while the main thread waited inside serve.run for a replica Ray could not place)."""

    def __init__(self, config, document, stop: threading.Event, proxies: dict | None = None):
        self.config, self.document, self.stop, self.proxies = config, document, stop, proxies
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._deploy, name="blip2-serve-deploy", daemon=True)

    def _deploy(self) -> None:
        import time

        from ray import serve

        try:
            _deploy(self.config, self.document, self.proxies)
            while not self.stop.is_set():  # until the application runs, or the controller says why not
                status = serve.status().applications.get(self.config.app_name)
                if status is not None and status.status == "RUNNING":
                    return
                if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                    state = getattr(status.status, "value", status.status)
                    raise ValueError(f"application {self.config.app_name!r} {state}: {_causes(status)}")
                time.sleep(0.5)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self.errors.append(exc)

    def run(self) -> bool:
        """True once the application runs, False when stopped first; the deployment's own error is raised here."""
        self.thread.start()
        while self.thread.is_alive():
            if self.stop.wait(0.2):
                return False
        if self.errors:
            raise self.errors[0]
        return True

    def settle(self, timeout_s: float = 30.0) -> None:
        """Before deleting: let a submission under way reach Serve (so that the delete finds it), and the thread end
        (it must make no Ray call once Ray is shut down)."""
        if self.thread.ident is None:
            return
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            logger.warning("the application was still being submitted after %.0f s; going on", timeout_s)


def _drain(config) -> None:
    """Before the application goes: its ingress replicas refuse new requests (503, Retry-After; readiness false)
    and finish the ones they hold, for at most server.drain_timeout_s. (Deleting at once would stop every stage
    together, stranding requests between two stages.)"""
    import time

    from blip2_serve.deployments import drain
    from ray import serve

    application = serve.status().applications.get(config.app_name)
    if application is None:
        return
    ingress = application.deployments.get("Ingress")
    expected = sum(n for state, n in ingress.replica_states.items() if str(state).endswith("RUNNING")) if ingress else 0
    coordinator = serve.get_deployment_handle(drain.NAME, app_name=config.app_name)
    coordinator.begin_drain.remote().result(timeout_s=10)
    deadline = time.monotonic() + config.server.drain_timeout_s
    state: dict = {}
    while time.monotonic() < deadline:
        state = coordinator.drained.remote().result(timeout_s=10)
        # every running ingress replica has said it drains, and none holds a request
        if state["draining"] >= max(expected, 1) and state["in_flight"] == 0:
            return
        time.sleep(0.1)
    logger.warning("requests still in flight after %.0f s of draining: %s", config.server.drain_timeout_s, state)


def _delete(app_name: str, timeout_s: float = 30.0) -> None:
    """Delete the application from a cluster we joined (`--address`), waiting for it at most `timeout_s`: Serve's own
    blocking delete waits forever for a replica Ray could never place (seen, when our own Ray deleted too:
    `--wait-for-resources` with a stage bigger than the node, then Ctrl-C)."""
    import time

    from ray import serve

    serve.delete(app_name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while app_name in serve.status().applications:
        if time.monotonic() > deadline:
            logger.warning("application %r still being deleted after %.0f s; going on", app_name, timeout_s)
            return
        time.sleep(0.2)


def _ports_in_use(config, wait_s: float = 5.0) -> list[str]:
    """The server's ports that cannot be had (something listens there), one line each, after waiting up to `wait_s`
    for them to free (a server stopped a moment ago). Checked before our own Ray starts: Ray's proxy binds with
    SO_REUSEPORT, so a second server on a port a first one holds starts "fine" and the kernel splits the connections
    between the two (seen: two `blip2-serve run --port 8125`, both listening); any other holder fails Ray's proxy
    with a traceback after Ray has started."""
    import time

    deadline = time.monotonic() + wait_s
    held = _held_ports(config)
    while any(busy for busy, _ in held) and time.monotonic() < deadline:
        time.sleep(0.25)
        held = _held_ports(config)
    return [problem for _, problem in held]


def _held_ports(config) -> list[tuple[bool, str]]:
    """The ports that cannot be bound now, one line each, with whether that is because they are in use (which may
    pass) rather than never bindable here."""
    import errno
    import socket

    ports = [("HTTP", config.server.host, config.server.http_port, "--port (server.http_port)")]
    if config.server.grpc_port is not None:  # Ray's gRPC proxy listens on every interface
        ports.append(("gRPC", "", config.server.grpc_port, "--grpc-port (server.grpc_port)"))
    problems: list[tuple[bool, str]] = []
    for name, host, port, flag in ports:
        if not port:  # 0: any free port
            continue
        where = f"{name} port {port}" + (f" on {host}" if host else "")
        try:  # the address the way Ray's proxy binds it (a name resolved; IPv6 where the host is)
            family, _, _, _, address = socket.getaddrinfo(host or "0.0.0.0", port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]  # fmt: skip
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a stopped server's TIME_WAIT: free
                probe.bind(address)
        except OSError as exc:
            if getattr(exc, "errno", None) == errno.EADDRINUSE:
                problems.append((True, f"{where} is already in use (another server?): choose another with {flag}, "
                                       "or stop what holds it"))  # fmt: skip
            else:
                problems.append((False, f"{where} cannot be bound ({exc.strerror or exc}): check --host (server.host)"))
    return problems


def _no_cluster_at(address: str, timeout_s: float = 10.0) -> str | None:
    """Why no Ray cluster can answer at `address` (host:port of its head), or None where one may. Checked before
    ray.init, which otherwise retries for minutes with a warning every few seconds (seen: `--address 127.0.0.1:1`,
    still trying after 2 min). "auto", ray:// and other forms are left to ray.init."""
    import socket
    import time

    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit() or "://" in address:
        return None
    deadline = time.monotonic() + timeout_s  # a head starting beside this command (compose, a pod) gets that long
    while True:
        try:
            left = max(0.5, deadline - time.monotonic())
            with socket.create_connection((host.strip("[]"), int(port)), timeout=left):
                return None
        except OSError as exc:
            if time.monotonic() >= deadline:
                return (
                    f"no Ray cluster answers at {address} ({exc.strerror or exc}): start one there (`ray start "
                    "--head`), or leave out --address (and RAY_ADDRESS) for a Ray of this command's own"
                )
            time.sleep(0.5)


def _refused(*problems: object) -> int:
    """Say on stderr, a line each, why `run` will not serve, and give its exit status for that (2)."""
    for problem in problems:
        print(f"blip2-serve: {problem}", file=sys.stderr, flush=True)
    return 2


def _why(exc: BaseException) -> str:
    """A start-up failure in a line: its first and last lines (a Ray error from another process ends with that
    process's error, after its traceback), e.g. "HTTP proxies not available after 60s." (seen on 2 cores under load)."""
    lines = _lines(str(exc))
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def run(args: argparse.Namespace) -> int:
    """Start Ray (local unless --address), deploy the graph, serve until SIGINT/SIGTERM (in-flight requests finish)."""
    import ray
    from blip2_serve.serve import placement
    from blip2_serve.serve.app import prepare_local_ray
    from blip2_serve.serve.checkpoints import CheckpointUnavailable

    config, document = _config_from_args(args)

    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    # "local": a new embedded Ray, even where `ray start` left a cluster behind that ray.init() would join
    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":  # hub names downloaded (or found in the cache) once, here, before Ray starts
        try:
            config, document = _resolved(config, document)
        except CheckpointUnavailable as exc:
            return _refused(exc)
        if taken := _ports_in_use(config):
            return _refused(*taken)
    elif (absent := _no_cluster_at(address)) is not None:
        return _refused(absent)
    # a signal while starting (the server may answer ready, from its ingress replica or a proxy, before serve.run
    # returns) stops as cleanly as one later
    stop, deployment, failure, proxies = threading.Event(), None, None, None
    try:
        if address == "local":  # the ingress replica serves the ports itself where it can (one replica: default)
            proxies = prepare_local_ray(config, document)
        for name in ("ray", "ray.serve"):  # Ray Serve's driver logger has a level of its own
            logging.getLogger(name).setLevel(_ray_level())
        num_cpus = args.num_cpus if address == "local" else None
        signal.signal(signal.SIGTERM, interrupt)  # until ray.init puts its own handler in place
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, logging_level=_ray_level())
        # ray.init installs its own SIGTERM handlers (sys.exit, then a crash dump and abort): ours go on top; from
        # here a signal only sets `stop`, which this thread watches (never an exception inside a Ray call)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        problems = [] if args.wait_for_resources else placement.check(config)
        if problems:
            status = _refused(*problems)
            ray.shutdown()
            return status
        print(f"blip2-serve: Ray is up; starting the model stages of {config.model.checkpoint}", flush=True)
        deployment = _Deployment(config, document, stop, proxies)
        if not stop.is_set() and deployment.run():
            url = f"http://{config.server.host}:{config.server.http_port}{config.route_prefix.rstrip('/')}"
            grpc = f", gRPC on port {config.server.grpc_port}" if config.server.grpc_port is not None else ""
            print(
                f"blip2-serve: model '{config.server.model_name}' ready at {url} "
                f"(KServe v2: {url}/v2, OpenAI: {url}/v1{grpc})",
                flush=True,
            )
            stop.wait()
    except (KeyboardInterrupt, SystemExit):  # SystemExit: Ray's handler, for a SIGTERM inside ray.init
        pass
    except Exception as exc:  # Ray or the application did not start: say why in a line, then stop what did start
        failure = exc
        logger.debug("start-up failed", exc_info=True)
        print(f"blip2-serve: the server did not start: {_why(exc)}", file=sys.stderr, flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal during shutdown does not cut it short
        signal.signal(sig, signal.SIG_IGN)
    print("blip2-serve: shutting down", flush=True)
    if ray.is_initialized():
        try:
            if deployment is not None:
                deployment.settle()
            if failure is None:  # a failed start serves nothing: no ingress replica would ever report drained
                _drain(config)
        except Exception as exc:  # interrupted before Serve was up: nothing to drain
            logger.warning("could not drain the application: %s", exc)
        # A cluster we joined keeps its Serve: our application goes. Our own Ray goes whole with ray.shutdown
        # below, once drained: deleting first only waited for Serve to stop each idle replica gracefully (about
        # 4 s of a 8 s Ctrl-C on 2 cores, tiny checkpoint; a replica Ray could not place took ~30 s).
        if address != "local":
            try:
                _delete(config.app_name, timeout_s=30.0)
            except Exception as exc:
                logger.warning("could not delete the application: %s", exc)
        # (serve.shutdown on our own Ray would only add the raylet's lines about the controller's tasks it cut short)
    ray.shutdown()
    return 1 if failure is not None else 0


def make_tiny(args: argparse.Namespace) -> int:
    """Write a small random checkpoint; its captions are gibberish."""
    from blip2_serve.exporters.tiny import make_tiny_checkpoint, make_tiny_itm_checkpoint

    if args.llm == "itm":
        path = make_tiny_itm_checkpoint(args.dir, seed=args.seed)
    else:
        path = make_tiny_checkpoint(args.dir, args.llm, size=args.size, seed=args.seed)
    print(f"wrote a {args.size} random BLIP-2 ({args.llm}) checkpoint to {path}; its outputs are gibberish")
    return 0


def export_onnx(args: argparse.Namespace) -> int:
    """Export the vision stage to ONNX, verified against torch; optionally int8 with its measured report."""
    from blip2_serve.exporters.onnx_export import export_vision_onnx, quantize_int8

    report = export_vision_onnx(args.model, args.out, opset=args.opset, fp16=args.fp16)
    print(f"wrote {report.graph} ({report.dtype}, opset {report.opset}, tolerance {report.tolerance:.3g})")
    if args.int8:
        from blip2_serve.exporters.int8_report import write_int8_report

        graph = quantize_int8(args.out)
        measured = write_int8_report(args.model, args.out)
        print(
            f"wrote {graph}: {measured['identical_greedy_answers']}/{measured['answers']} greedy answers identical "
            f"to fp32, vision speed ratio fp32/int8 {measured['speed_ratio_fp32_over_int8']} (int8_report.json)"
        )
    return 0


def export_triton_repo(args: argparse.Namespace) -> int:
    """Write a Triton model repository of the graph."""
    from blip2_serve.exporters.triton_repo import write_triton_repo

    repo = write_triton_repo(
        args.model,
        args.out,
        vision=args.vision,
        max_batch=args.max_batch,
        instances=args.instances,
        env_path=args.env_path,
        dtype=args.dtype,
        device=args.device,
    )
    print(f"wrote a Triton model repository to {repo}: blip2, blip2_vision ({args.vision}), blip2_llm")
    return 0


def triton(args: argparse.Namespace) -> int:
    """Run the real tritonserver (from nvidia-pytriton) on 127.0.0.1 with a repository."""
    from blip2_serve.exporters.tritonserver import TritonPorts, run_tritonserver

    return run_tritonserver(args.repo, TritonPorts(args.http_port, args.grpc_port, args.metrics_port))


def print_config(args: argparse.Namespace) -> int:
    """A Ray Serve config file for `serve run`, `serve deploy`, KubeRay's serveConfigV2 and `blip2-serve run --config`:
    every AppConfig default under the application's args, each deployment's options in its `deployments:` section."""
    import yaml
    from blip2_serve.serve.deploy_config import serve_config

    if not args.model and not args.config:
        args.model = "Salesforce/blip2-opt-2.7b"
    config, document = _config_from_args(args)
    text = yaml.safe_dump(document or serve_config(config), sort_keys=False)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return 0


def batch(args: argparse.Namespace) -> int:
    """`blip2-serve batch caption|embed INPUT --model CKPT --out OUT`: a Ray Data job over a whole collection."""
    import ray
    from blip2_serve.clients.contract import question_prompt
    from blip2_serve.deployments.config import ModelConfig
    from blip2_serve.serve.app import prepare_local_ray
    from blip2_serve.serve.batch import BatchJob, run_batch
    from blip2_serve.serve.checkpoints import CheckpointUnavailable, resolve

    prompts: tuple[str, ...] = ("",)
    if args.task == "caption" and args.questions:
        questions = [line.strip() for line in Path(args.questions).read_text().splitlines() if line.strip()]
        if not questions:
            raise ValueError(f"{args.questions} holds no question (one per line)")
        prompts = tuple(question_prompt(q) for q in questions)
    elif args.task == "caption" and args.prompt is not None:
        prompts = (args.prompt,)
    try:
        checkpoint = resolve(ModelConfig(checkpoint=args.model)).checkpoint
    except CheckpointUnavailable as exc:
        print(f"blip2-serve batch: {exc}", file=sys.stderr)
        return 2
    job = BatchJob(
        task=args.task,
        source=args.input,
        checkpoint=checkpoint,
        out=args.out,
        prompts=prompts,
        max_new_tokens=getattr(args, "max_new_tokens", None) or DEFAULT_MAX_NEW_TOKENS,
        num_beams=getattr(args, "num_beams", None) or 1,
        device=args.device,
        dtype=args.dtype,
        vision_replicas=args.vision_replicas,
        llm_replicas=getattr(args, "llm_replicas", 1),
        num_gpus_per_replica=args.num_gpus_per_replica,
        restart_actors=(args.address or os.environ.get("RAY_ADDRESS") or "local") != "local",
    )
    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        prepare_local_ray()
    elif (absent := _no_cluster_at(address)) is not None:
        print(f"blip2-serve batch: {absent}", file=sys.stderr)
        return 2
    ray.init(address=address, include_dashboard=False, logging_level=_ray_level(), log_to_driver=False)
    try:
        summary = run_batch(job, progress=not args.quiet)
    finally:
        ray.shutdown()
    print(summary.line(args.out))
    return 0


def _batch_flags(command: argparse.ArgumentParser, llm: bool) -> None:
    command.add_argument(
        "input",
        help="a folder (recursive), a glob, or a manifest (.jsonl/.csv/.parquet: 'image', "
        "optional 'id' and 'prompt'); paths or URIs (s3://, gs:// where credentials exist)",
    )
    command.add_argument("--model", required=True, help="checkpoint directory or hub name")
    command.add_argument("--out", required=True, help="a folder of Parquet files, or a .jsonl file; rerun to resume")
    command.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    command.add_argument("--vision-replicas", type=int, default=1, help="actors of the vision stage")
    if llm:
        command.add_argument("--llm-replicas", type=int, default=1, help="actors of the LLM stage")
    command.add_argument("--num-gpus-per-replica", type=float, default=0.0)
    command.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    command.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    command.add_argument("--quiet", action="store_true", help="no progress bar (the summary line only)")
    command.set_defaults(func=batch)


def _server_flags(command: argparse.ArgumentParser) -> None:
    command.add_argument("--host", help="address to bind (default 127.0.0.1)")
    command.add_argument("--port", type=int, help="HTTP port (default 8000)")
    command.add_argument("--grpc-port", type=int, help="KServe v2 gRPC port (default 8001; 0 turns gRPC off)")
    command.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"])
    command.add_argument("--quantization", choices=["none", "int8", "int4"], help="LLM weights via bitsandbytes")
    command.add_argument("--device", choices=["auto", "cpu", "cuda"])
    command.add_argument("--api-key-env", help="environment variable holding the API key every route but health needs")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="blip2-serve", description="A model server for Salesforce BLIP-2.")
    commands = root.add_subparsers(dest="command", required=True)

    run_cmd = commands.add_parser("run", help="serve a checkpoint over HTTP (KServe v2)")
    run_cmd.add_argument("--model", help="checkpoint directory or hub name, e.g. Salesforce/blip2-opt-2.7b")
    run_cmd.add_argument("--config", help="YAML or JSON AppConfig (see `blip2-serve config`)")
    _server_flags(run_cmd)
    run_cmd.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    run_cmd.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    run_cmd.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="this command's and Ray Serve's log level (default INFO; WARNING keeps the console to problems)",
    )
    run_cmd.add_argument(
        "--wait-for-resources",
        action="store_true",
        help="deploy even where the cluster has no room for every stage now (it adds nodes on demand); "
        "by default a config that cannot be placed exits at once, naming the stage",
    )
    run_cmd.set_defaults(func=run)

    tiny = commands.add_parser("make-tiny", help="write a small random BLIP-2 checkpoint (no hub needed)")
    tiny.add_argument("dir")
    tiny.add_argument("--llm", choices=["opt", "t5", "itm"], default="opt", help="itm: a retrieval checkpoint")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--size",
        choices=["tiny", "realistic", "medium"],
        default="tiny",
        help="realistic: published widths, layers in the published FLOPs split; medium: published widths, 2 layers",
    )
    tiny.set_defaults(func=make_tiny)

    export = commands.add_parser("export", help="export ONNX graphs or a Triton model repository")
    exports = export.add_subparsers(dest="target", required=True)
    onnx = exports.add_parser("onnx", help="vision tower + Q-Former + projection as one ONNX graph")
    onnx.add_argument("--model", required=True, help="checkpoint directory or hub name")
    onnx.add_argument("--out", required=True, help="directory to write vision.onnx (and reports) to")
    onnx.add_argument("--opset", type=int, default=17)
    onnx.add_argument("--fp16", action="store_true", help="export in half precision")
    onnx.add_argument("--int8", action="store_true", help="also an ONNX Runtime dynamic int8 graph, measured")
    onnx.set_defaults(func=export_onnx)
    repo = exports.add_parser("triton-repo", help="a Triton model repository: blip2, blip2_vision, blip2_llm")
    repo.add_argument("--model", required=True, help="checkpoint directory or hub name")
    repo.add_argument("--out", required=True, help="repository directory (replaced)")
    repo.add_argument("--vision", choices=["python", "onnxruntime"], default="python")
    repo.add_argument("--max-batch", type=int, default=MAX_BATCH_SIZE)
    repo.add_argument("--instances", type=int, default=1, help="instances of each model")
    repo.add_argument("--env-path", help="Python environment the Python backend runs in (default: this one)")
    repo.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    repo.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    repo.set_defaults(func=export_triton_repo)

    batch_cmd = commands.add_parser("batch", help="caption or embed a whole collection offline, on Ray Data")
    tasks = batch_cmd.add_subparsers(dest="task", required=True)
    caption = tasks.add_parser("caption", help="a caption (or an answer per prompt/question) for every image")
    _batch_flags(caption, llm=True)
    asked = caption.add_mutually_exclusive_group()
    asked.add_argument("--prompt", help="one prompt for every image (default: plain captioning)")
    asked.add_argument("--questions", help="a file of questions, one per line: every image is asked each")
    caption.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    caption.add_argument("--num-beams", type=int, default=1)
    embed = tasks.add_parser("embed", help="an L2-normalised embedding (blip2_embed_image's) for every image")
    _batch_flags(embed, llm=False)

    serve_triton = commands.add_parser("triton", help="run tritonserver (nvidia-pytriton's) on a repository")
    serve_triton.add_argument("--repo", required=True)
    serve_triton.add_argument("--http-port", type=int, default=8000)
    serve_triton.add_argument("--grpc-port", type=int, default=8001)
    serve_triton.add_argument("--metrics-port", type=int, default=8002)
    serve_triton.set_defaults(func=triton)

    from blip2_serve.clients.cli import register

    register(commands)

    cfg = commands.add_parser("config", help="write a Ray Serve config file (serve run / serve deploy / KubeRay)")
    cfg.add_argument("--model", help="checkpoint directory or hub name (default Salesforce/blip2-opt-2.7b)")
    cfg.add_argument("--config", help="an existing config to start from (AppConfig or Serve config)")
    _server_flags(cfg)
    cfg.add_argument("--autoscale", metavar="MIN:MAX", help="replicas of the vision and LLM stages, e.g. 1:3")
    cfg.add_argument("--out", help="write here instead of stdout")
    cfg.set_defaults(func=print_config)
    return root


def _ray_level() -> int:
    """Ray's and Ray Serve's own log level (the driver, the controller, the proxies): WARNING unless `--log-level`
    is DEBUG, so that the console holds this server's lines (and one access line per request), not Ray's start-up
    banner and routing tables."""
    level = logging.getLogger().level
    return level if level <= logging.DEBUG else max(level, logging.WARNING)


def _serve_logging() -> dict[str, str]:
    return {"log_level": logging.getLevelName(_ray_level())}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    server_side = args.command in ("run", "make-tiny", "export", "triton", "batch")
    level = logging.INFO if server_side else logging.WARNING  # client commands print only their results
    level = getattr(args, "log_level", None) or level
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("blip2_serve").setLevel(level)  # read where the server is built (serve/app.py)
    from blip2_serve.clients.errors import Blip2Error

    try:
        return args.func(args)
    except ImportError as exc:
        hint = "the server needs: pip install 'blip2-serve[server]'"
        print(f"blip2-serve {args.command}: {exc}; {hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"blip2-serve {args.command}: interrupted", file=sys.stderr)
        return 130
    except (Blip2Error, OSError, ValueError) as exc:  # one line for people, no traceback
        print(f"blip2-serve {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
