// Read message events with the npm SparkPost client; used by
// tests/integration/test_events_api.py.
// stdin: {"origin": "http://127.0.0.1:PORT", "key": "API key", "calls": [params, ...]}
//   each params object goes to client.events.searchMessage unchanged
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
  for (const params of req.calls) {
    try {
      const body = await client.events.searchMessage(params);
      out.push({ ok: true, body });
    } catch (err) {
      out.push({ ok: false, status: err.statusCode, errors: err.errors });
    }
  }
  console.log(JSON.stringify(out));
});
