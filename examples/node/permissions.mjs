// The official OpenAI Node SDK (`npm install openai`) against `permgate demo`.
//
//   node examples/node/permissions.mjs     # with `permgate demo` running; see README.md
//
// The Node SDK treats the checkpoint permission endpoints as admin endpoints: it sends
// `adminAPIKey` (default: the OPENAI_ADMIN_KEY environment variable) as the bearer token and
// ignores `apiKey` there. So `adminAPIKey`, or OPENAI_ADMIN_KEY in the caller's own environment,
// carries the caller's permgate token, never the organization admin key.
//
// `adminAPIKey` takes only a string (unlike `apiKey`, which may be a function but is not sent
// to these endpoints). To read a rotating token file (as a Kubernetes projected token rotates)
// before every HTTP attempt, retries included, override the client's `adminAPIKeyAuth` hook.
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI from 'openai';

const baseURL = process.env.PERMGATE_BASE_URL ?? 'http://127.0.0.1:8080/v1';
const checkpoint = 'ft:gpt-4o-mini-2024-07-18:acme:weather:B7R9VjQd'; // seeded by the demo's mock

// The token file. In a pod it is the mounted file that the kubelet rotates; here the example
// writes it itself to play the rotation.
const tokenFile = join(mkdtempSync(join(tmpdir(), 'permgate-')), 'token');
let tokenReads = 0;
const readToken = () => {
  tokenReads += 1;
  return readFileSync(tokenFile, 'utf8').trim();
};

// The credential as a function: the SDK calls adminAPIKeyAuth while building each attempt.
class PermgateClient extends OpenAI {
  async adminAPIKeyAuth(opts) {
    this.adminAPIKey = readToken();
    return super.adminAPIKeyAuth(opts);
  }
}

// Every HTTP attempt goes through this fetch wrapper: it counts attempts and shows permgate's
// retry advice.
let attempts = [];
async function countingFetch(url, init) {
  const response = await fetch(url, init);
  const advice = Object.fromEntries(
    ['x-should-retry', 'retry-after-ms', 'retry-after']
      .filter((h) => response.headers.has(h))
      .map((h) => [h, response.headers.get(h)]),
  );
  attempts.push(advice);
  const token = new Headers(init.headers).get('authorization').replace('Bearer ', '');
  const shown = Object.keys(advice).length ? ' ' + JSON.stringify(advice) : '';
  console.log(`    attempt ${attempts.length}: ${response.status} as ${token}${shown}`);
  return response;
}

writeFileSync(tokenFile, 'demo-reader-token\n');
const client = new PermgateClient({
  baseURL,
  adminAPIKey: readToken(), // satisfies the constructor's credential check; re-read per attempt
  fetch: countingFetch,
  // maxRetries is the default, 2: the 404 and 403 below are not retried because permgate
  // answers `x-should-retry: false`, not because retries are off.
});
const permissions = client.fineTuning.checkpoints.permissions;

function step(title) {
  attempts = [];
  tokenReads = 0;
  console.log(`\n${title}`);
}

step('1. list a seeded checkpoint with the reader token');
const page = await permissions.list(checkpoint, { limit: 3 });
for (const p of page.data) console.log(`    ${p.id}  ${p.project_id}`);
console.log(`    has_more=${page.has_more}; ${attempts.length} HTTP attempt`);

step('2. unknown checkpoint: 404, raised at once');
try {
  await permissions.list('ft:gpt-4o-mini-2024-07-18:acme:nope:XXXXXXXX');
} catch (e) {
  if (!(e instanceof OpenAI.NotFoundError)) throw e;
  console.log(`    ${e.constructor.name} ${e.status} ${e.code}; ${attempts.length} HTTP attempt`);
}
if (attempts.length !== 1) throw new Error('expected one attempt');

step('3. the reader tries to create: 403, raised at once');
try {
  await permissions.create(checkpoint, { project_ids: ['proj_example'] });
} catch (e) {
  if (!(e instanceof OpenAI.PermissionDeniedError)) throw e;
  console.log(`    ${e.constructor.name} ${e.status} ${e.code}; ${attempts.length} HTTP attempt`);
}
if (attempts.length !== 1) throw new Error('expected one attempt');

// The token file rotates to the rate-limited client's token (1 request/s, burst 1). The same
// client object sends the new token from its next attempt on.
writeFileSync(tokenFile, 'demo-limited-token\n');

step('4. rate-limited client: the second request within a second gets 429; the SDK waits and retries');
await permissions.list(checkpoint, { limit: 1 }); // takes the bucket's only token
attempts = [];
tokenReads = 0;
console.log('    the timed call:');
const started = performance.now();
const limited = await permissions.list(checkpoint, { limit: 1 });
const elapsedMs = performance.now() - started;
const askedMs = attempts[0]['retry-after-ms'];
console.log(
  `    succeeded: ${attempts.length} HTTP attempts in ${elapsedMs.toFixed(0)} ms ` +
    `(permgate asked for ${askedMs} ms); the token file was read ${tokenReads} times`,
);
if (attempts.length < 2 || elapsedMs < Number(askedMs) || !limited.data.length) {
  throw new Error('expected a 429, a wait and a success');
}
