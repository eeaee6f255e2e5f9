"""The official OpenAI Python SDK against permgate over HTTPS with a client certificate.

Run by tests/it/tls_listener.rs (the_python_sdk_with_a_client_certificate_gets_its_clients_grants):

    python client_certificate.py BASE_URL CA_FILE CERT_FILE KEY_FILE GRANTED_CHECKPOINT DENIED_CHECKPOINT

The SDK always sends its `api_key`; the certificate names the client, so the key here names
nobody. The TLS settings go in through the SDK's own httpx client. Prints one line per call.
"""

import ssl
import sys

import openai
from openai import DefaultHttpxClient, OpenAI

base_url, ca_file, cert_file, key_file, granted, denied = sys.argv[1:7]
tls = ssl.create_default_context(cafile=ca_file)
tls.load_cert_chain(cert_file, key_file)
client = OpenAI(
    base_url=base_url,
    api_key="not-a-permgate-token",
    max_retries=0,
    http_client=DefaultHttpxClient(verify=tls),
)

page = client.fine_tuning.checkpoints.permissions.list(granted)
print(f"listed {len(page.data)}", flush=True)
try:
    client.fine_tuning.checkpoints.permissions.list(denied)
    print("denied: not refused", flush=True)
except openai.PermissionDeniedError as e:
    print(f"denied {e.status_code} {e.code}", flush=True)
