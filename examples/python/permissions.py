"""The official OpenAI Python SDK (`pip install openai`) against `permgate demo`.

    python examples/python/permissions.py      # with `permgate demo` running; see README.md

On these endpoints the SDK sends `api_key` as `Authorization: Bearer ...`, so `api_key` carries
the caller's permgate token (never the organization admin key). `api_key` may be a function:
the SDK calls it before every HTTP attempt, retries included, so a token file that rotates (as
a Kubernetes projected token does) is read afresh each time.
"""

import os
import tempfile
import time
from pathlib import Path

import openai
from openai import OpenAI

BASE_URL = os.environ.get("PERMGATE_BASE_URL", "http://127.0.0.1:8080/v1")
CHECKPOINT = "ft:gpt-4o-mini-2024-07-18:acme:weather:B7R9VjQd"  # seeded by the demo's mock

# The token file. In a pod it is the mounted file that the kubelet rotates; here the example
# writes it itself to play the rotation.
TOKEN_FILE = Path(tempfile.mkdtemp()) / "permgate-token"
token_reads = 0


def read_token() -> str:
    global token_reads
    token_reads += 1
    return TOKEN_FILE.read_text().strip()


# Every HTTP attempt the SDK makes passes through this httpx response hook: it counts the
# attempts and shows permgate's retry advice.
attempts: list[dict] = []


def on_response(response) -> None:
    advice = {h: response.headers[h] for h in ("x-should-retry", "retry-after-ms", "retry-after") if h in response.headers}
    attempts.append(advice)
    token = response.request.headers["authorization"].removeprefix("Bearer ")
    print(f"    attempt {len(attempts)}: {response.status_code} as {token} {advice or ''}".rstrip())


client = OpenAI(
    base_url=BASE_URL,
    api_key=read_token,  # a function, called before each attempt
    http_client=openai.DefaultHttpxClient(event_hooks={"response": [on_response]}),
    # max_retries is the default, 2: the 404 and 403 below are not retried because permgate
    # answers `x-should-retry: false`, not because retries are off.
)
permissions = client.fine_tuning.checkpoints.permissions


def step(title: str) -> None:
    global token_reads
    attempts.clear()
    token_reads = 0
    print(f"\n{title}")


TOKEN_FILE.write_text("demo-reader-token\n")

step("1. list a seeded checkpoint with the reader token")
page = permissions.list(CHECKPOINT, limit=3)
for p in page.data:
    print(f"    {p.id}  {p.project_id}")
print(f"    has_more={page.has_more}; {len(attempts)} HTTP attempt")

step("2. unknown checkpoint: 404, raised at once")
try:
    permissions.list("ft:gpt-4o-mini-2024-07-18:acme:nope:XXXXXXXX")
except openai.NotFoundError as e:
    print(f"    {type(e).__name__} {e.status_code} {e.code}; {len(attempts)} HTTP attempt")
assert len(attempts) == 1

step("3. the reader tries to create: 403, raised at once")
try:
    permissions.create(CHECKPOINT, project_ids=["proj_example"])
except openai.PermissionDeniedError as e:
    print(f"    {type(e).__name__} {e.status_code} {e.code}; {len(attempts)} HTTP attempt")
assert len(attempts) == 1

# The token file rotates to the rate-limited client's token (1 request/s, burst 1). The same
# client object sends the new token from its next attempt on.
TOKEN_FILE.write_text("demo-limited-token\n")

step("4. rate-limited client: the second request within a second gets 429; the SDK waits and retries")
permissions.list(CHECKPOINT, limit=1)  # takes the bucket's only token
attempts.clear()
token_reads = 0
print("    the timed call:")
started = time.monotonic()
page = permissions.list(CHECKPOINT, limit=1)
elapsed_ms = (time.monotonic() - started) * 1000
asked_ms = attempts[0].get("retry-after-ms")
print(f"    succeeded: {len(attempts)} HTTP attempts in {elapsed_ms:.0f} ms (permgate asked for {asked_ms} ms);"
      f" the token file was read {token_reads} times")
assert len(attempts) >= 2 and elapsed_ms >= int(asked_ms)
