// Manage webhooks with the npm SparkPost client; used by tests/integration/test_webhooks.py.
// stdin: {"origin": "http://127.0.0.1:PORT", "key": "API key", "calls": [[method, ...args], ...]}
//   method: one of the client's webhooks methods (create, list, get, update, validate,
//   getBatchStatus, getDocumentation, getSamples, delete); the string "$id" in an argument
//   is replaced by the id the last create returned.
// stdout: one JSON array, per call {"ok": true, "body": <resolved value>}
//   or {"ok": false, "status": <HTTP status>, "errors": [...]}
'use strict';
const SparkPost = require('sparkpost');

let input = '';
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', async () => {
  const req = JSON.parse(input);
  // Only the base address differs from a real SparkPost set-up.
  const client = new SparkPost(req.key, { origin: req.origin });
  const out = [];
  let id = null;
  for (const [method, ...args] of req.calls) {
    const real = args.map((a) => (a === '$id' ? id : a));
    try {
      const body = await client.webhooks[method](...real);
      if (method === 'create') { id = body.results.id; }
      out.push({ ok: true, body });
    } catch (err) {
      out.push({ ok: false, status: err.statusCode, errors: err.errors });
    }
  }
  console.log(JSON.stringify(out));
});
