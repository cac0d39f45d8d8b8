"""OpenAI's Batch API routes: `/v1/files` (upload with purpose `batch`, list, retrieve, content, delete) and
`/v1/batches` (create, retrieve, list, cancel), as the `openai` package calls them.

The routes parse and check the request, then call the Batches deployment (serve/batch_jobs.py) through the front
door; that replica keeps the files and runs the batches.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class in route signatures.
from typing import Optional

from blip2_serve.deployments import jsonbody
from blip2_serve.deployments.errors import InvalidInput, PayloadTooLarge
from blip2_serve.serve.asgi import front_door, read_body
from blip2_serve.serve.frontdoor import FrontDoor
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

router = APIRouter()

MULTIPART_SLACK = 64 * 1024  # the form's own bytes (boundaries, headers, the purpose field) around the file
MAX_CREATE_BYTES = 64 * 1024  # a create request is four small fields


async def _upload(request: Request, limit: int) -> tuple[str, str, bytes]:
    """(filename, purpose, bytes) of a multipart/form-data upload with fields `file` and `purpose`; the file at
    most `limit` bytes."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidInput("upload the file as multipart/form-data with the fields 'file' and 'purpose'")
    raw = await read_body(request, limit + MULTIPART_SLACK)

    async def replay() -> dict:
        return {"type": "http.request", "body": raw, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
    except Exception as exc:  # Starlette's MultiPartException (or its HTTPException): a malformed form
        raise InvalidInput(f"the upload is not valid multipart/form-data: {getattr(exc, 'detail', exc)}") from None
    try:
        file, purpose = form.get("file"), form.get("purpose")
        if not isinstance(file, UploadFile):
            raise InvalidInput("the form needs a 'file' field holding the file")
        if not isinstance(purpose, str):
            raise InvalidInput("the form needs a 'purpose' field ('batch')")
        data = await file.read()
        if len(data) > limit:
            raise PayloadTooLarge(f"the file is {len(data)} bytes; the limit is {limit}")
        return file.filename or "upload.jsonl", purpose, data
    finally:
        await form.close()


@router.post("/v1/files")
async def create_file(request: Request, door: FrontDoor = Depends(front_door)) -> Response:
    filename, purpose, data = await _upload(request, door.server.batch_max_file_bytes)
    return JSONResponse(await door.batch_api("add_file", filename, purpose, data))


@router.get("/v1/files")
async def list_files(purpose: Optional[str] = None, door: FrontDoor = Depends(front_door)) -> Response:
    return JSONResponse(await door.batch_api("files", purpose))


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, door: FrontDoor = Depends(front_door)) -> Response:
    return JSONResponse(await door.batch_api("file", file_id))


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, door: FrontDoor = Depends(front_door)) -> Response:
    return Response(await door.batch_api("content", file_id), media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, door: FrontDoor = Depends(front_door)) -> Response:
    return JSONResponse(await door.batch_api("delete_file", file_id))


@router.post("/v1/batches")
async def create_batch(request: Request, door: FrontDoor = Depends(front_door)) -> Response:
    body = jsonbody.loads_object(await read_body(request, MAX_CREATE_BYTES), "the request body")
    return JSONResponse(await door.batch_api("create", body))


@router.get("/v1/batches")
async def list_batches(after: Optional[str] = None, limit: int = 20, door: FrontDoor = Depends(front_door)) -> Response:
    return JSONResponse(await door.batch_api("batches", after, limit))


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(batch_id: str, door: FrontDoor = Depends(front_door)) -> Response:
    return JSONResponse(await door.batch_api("batch", batch_id))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, door: FrontDoor = Depends(front_door)) -> Response:
    return JSONResponse(await door.batch_api("cancel", batch_id))
