// Send one transmission with the npm SparkPost client; used by tests/integration/test_http_api.py.
// stdin: {"origin": "http://127.0.0.1:PORT", "key": "API key", "transmission": {...}}
// stdout: {"ok": true, "body": <the client's resolved value>}
//      or {"ok": false, "status": <HTTP status>, "errors": [...]}
'use strict';
const SparkPost = require('sparkpost');

let input = '';
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => {
  const req = JSON.parse(input);
  // Only the base address differs from a real SparkPost set-up.
  const client = new SparkPost(req.key, { origin: req.origin });
  client.transmissions.send(req.transmission)
    .then((body) => { console.log(JSON.stringify({ ok: true, body })); })
    .catch((err) => {
      console.log(JSON.stringify({ ok: false, status: err.statusCode, errors: err.errors,
                                   message: String(err.message) }));
    });
});
