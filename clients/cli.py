"""`blip2-serve caption | ask | chat`: the SDK for people. Needs only the client install.

Errors print one line and exit non-zero. `caption --out FILE.jsonl` appends one line per image as it is
captioned and, run again, skips the images already in the file (a line cut short by a kill is dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from blip2_serve.clients.errors import Blip2Error, ConnectionFailedError, ServiceUnavailableError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=os.environ.get("BLIP2_SERVE_URL", "127.0.0.1:8000"), help="server address")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http")
    parser.add_argument("--max-new-tokens", type=int, help="generation length")
    parser.add_argument(
        "--api-key-env",
        default="BLIP2_SERVE_API_KEY",
        help="environment variable holding the server's API key, if it wants one (default BLIP2_SERVE_API_KEY)",
    )


def _api_key(args: argparse.Namespace) -> str | None:
    return os.environ.get(args.api_key_env) or None


def _generation(args: argparse.Namespace) -> dict:
    return {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}


def image_files(paths: list[str]) -> list[Path]:
    """Files as given, and the images under directories (recursively, sorted)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such file or directory: {raw}")
    return found


def _done_and_repair(out: Path) -> set[str]:
    """Images already captioned in `out`; a last line cut short by a kill is removed from the file."""
    if not out.exists():
        return set()
    data = out.read_bytes()
    keep = data if data.endswith(b"\n") or not data else data[: data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with out.open("r+b") as handle:
            handle.truncate(len(keep))
    done = set()
    for line in keep.decode("utf-8").splitlines():
        if line.strip():
            done.add(json.loads(line)["image"])
    return done


async def _caption_files(args: argparse.Namespace) -> int:
    from blip2_serve.clients.sdk import AsyncBlip2Client
    from tqdm import tqdm

    files = image_files(args.images)
    out = Path(args.out) if args.out else None
    done = _done_and_repair(out) if out else set()
    todo = [f for f in files if str(f) not in done]
    failures = 0
    sink = out.open("a", encoding="utf-8") if out else sys.stdout
    limit = asyncio.Semaphore(args.concurrency)
    async with AsyncBlip2Client(args.url, args.protocol, api_key=_api_key(args)) as client:
        progress = tqdm(total=len(files), initial=len(files) - len(todo), unit="img", disable=not args.progress)

        async def one(path: Path) -> None:
            nonlocal failures
            async with limit:
                try:
                    caption = await client.caption(path.read_bytes(), **_generation(args))
                except (ConnectionFailedError, ServiceUnavailableError):
                    raise  # the server, not this image: stop; a rerun resumes
                except Blip2Error as exc:
                    failures += 1
                    print(f"{path}: {exc}", file=sys.stderr)
                    return
            sink.write(json.dumps({"image": str(path), "caption": caption}) + "\n")
            sink.flush()
            progress.update()

        try:
            await asyncio.gather(*(one(path) for path in todo))
        finally:
            progress.close()
            if out:
                sink.close()
    if failures:
        print(f"blip2-serve caption: {failures} of {len(todo)} images failed", file=sys.stderr)
        return 1
    return 0


def caption(args: argparse.Namespace) -> int:
    return asyncio.run(_caption_files(args))


def ask(args: argparse.Namespace) -> int:
    from blip2_serve.clients.sdk import Blip2Client

    with Blip2Client(args.url, args.protocol, api_key=_api_key(args)) as client:
        answers = client.ask_many(args.image, args.questions, **_generation(args))
    for question, answer in zip(args.questions, answers):
        print(f"Q: {question}\nA: {answer}")
    return 0


def chat(args: argparse.Namespace) -> int:
    """An interactive conversation about one image; answers stream as they are generated."""
    from blip2_serve.clients.contract import dialogue_prompt
    from blip2_serve.clients.sdk import Blip2Client

    image = Path(args.image).read_bytes()
    turns: list[tuple[str, str]] = []
    with Blip2Client(args.url, args.protocol, api_key=_api_key(args)) as client:
        while True:
            try:
                question = input("you> ").strip()
            except EOFError:
                print()
                return 0
            if question in ("exit", "quit"):
                return 0
            if not question:
                continue
            print("blip2> ", end="", flush=True)
            pieces = []
            for piece in client.stream(image, dialogue_prompt(turns, question), **_generation(args)):
                pieces.append(piece)
                print(piece, end="", flush=True)
            print()
            turns.append((question, "".join(pieces)))


async def _index_files(args: argparse.Namespace) -> int:
    from blip2_serve.clients.image_index import ImageIndex
    from blip2_serve.clients.sdk import AsyncBlip2Client
    from tqdm import tqdm

    files = image_files([args.dir])
    async with AsyncBlip2Client(args.url, args.protocol, api_key=_api_key(args)) as client:
        index = None
        try:
            index = ImageIndex(args.out)
        except FileNotFoundError:
            pass
        done = set(index.paths) if index is not None else set()
        todo = [f for f in files if str(f) not in done]
        progress = tqdm(total=len(files), initial=len(files) - len(todo), unit="img", disable=not args.progress)
        try:
            for start in range(0, len(todo), args.batch):
                chunk = todo[start : start + args.batch]
                embeddings = await client.embed_images([p.read_bytes() for p in chunk])
                if index is None:
                    index = ImageIndex(args.out, dimension=embeddings.shape[1])
                index.add([str(p) for p in chunk], embeddings)  # saved: a rerun resumes after this batch
                progress.update(len(chunk))
        finally:
            progress.close()
    print(f"{args.out}: {len(index) if index is not None else 0} images", file=sys.stderr)
    return 0


def index_folder(args: argparse.Namespace) -> int:
    return asyncio.run(_index_files(args))


def search(args: argparse.Namespace) -> int:
    from blip2_serve.clients.image_index import ImageIndex
    from blip2_serve.clients.sdk import Blip2Client

    index = ImageIndex(args.index)
    with Blip2Client(args.url, args.protocol, api_key=_api_key(args)) as client:
        query = client.embed_texts([args.text])[0]
    for match in index.search(query, args.k):
        print(f"{match.score:.4f}\t{match.path}")
    return 0


def match(args: argparse.Namespace) -> int:
    from blip2_serve.clients.sdk import Blip2Client

    with Blip2Client(args.url, args.protocol, api_key=_api_key(args)) as client:
        scores = client.match(args.image, args.text)
    print(f"itm {scores['itm']:.4f}\titc {scores['itc']:.4f}")
    return 0


def register(commands) -> None:
    """Add caption, ask, chat, index, search and match to the `blip2-serve` parser."""
    idx = commands.add_parser("index", help="embed a folder of images into a search index (resumable)")
    idx.add_argument("dir")
    idx.add_argument("--out", required=True, help="index file (INDEX and INDEX.json); a rerun adds what is missing")
    idx.add_argument("--batch", type=int, default=8, help="images per request")
    idx.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_client_options(idx)
    idx.set_defaults(func=index_folder)

    find = commands.add_parser("search", help="the images of an index that best match a text")
    find.add_argument("index")
    find.add_argument("text")
    find.add_argument("-k", type=int, default=5)
    add_client_options(find)
    find.set_defaults(func=search)

    pair = commands.add_parser("match", help="ITM probability and ITC similarity of an image and a text")
    pair.add_argument("image")
    pair.add_argument("text")
    add_client_options(pair)
    pair.set_defaults(func=match)

    cap = commands.add_parser("caption", help="caption images and directories of images")
    cap.add_argument("images", nargs="+", help="image files or directories")
    cap.add_argument("--out", help="JSONL file to append to; a rerun skips images already in it")
    cap.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    cap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_client_options(cap)
    cap.set_defaults(func=caption)

    question = commands.add_parser("ask", help="ask questions about an image")
    question.add_argument("image")
    question.add_argument("questions", nargs="+")
    add_client_options(question)
    question.set_defaults(func=ask)

    talk = commands.add_parser("chat", help="talk about an image; answers stream in")
    talk.add_argument("image")
    add_client_options(talk)
    talk.set_defaults(func=chat)
