"""The official OpenAI Python SDK against permgate with a rotating JWT token file.

Run by tests/it/identity.rs (the_python_sdk_follows_a_rotated_token_file):

    python rotating_token.py BASE_URL TOKEN_FILE GRANTED_CHECKPOINT DENIED_CHECKPOINT

`api_key` is a function: the SDK calls it before every HTTP attempt, so a token file that
kubelet (here, the test) replaces is read fresh. Prints one line per step; after "rotate" it
waits for a line on stdin, by which time the file holds a newly signed token.
"""

import sys
from pathlib import Path

import openai
from openai import OpenAI

base_url, token_file, granted, denied = sys.argv[1:5]
client = OpenAI(
    base_url=base_url,
    api_key=lambda: Path(token_file).read_text().strip(),
    max_retries=0,
)


def list_granted():
    page = client.fine_tuning.checkpoints.permissions.list(granted)
    print(f"listed {len(page.data)}", flush=True)


list_granted()
print("rotate", flush=True)
sys.stdin.readline()
list_granted()
list_granted()
try:
    client.fine_tuning.checkpoints.permissions.list(denied)
    print("denied: not refused", flush=True)
except openai.PermissionDeniedError as e:
    print(f"denied {e.status_code} {e.code}", flush=True)
