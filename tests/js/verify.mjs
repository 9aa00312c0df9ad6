// Independent DKIM verifier for tests/test_dkim.py, built on mailauth 4: 4.9.5 on Node
// >= 20.18.1, 4.8.2 (tests/js/node18) on Debian 12's Node 18; see tests/setup-deps.d/dkim.sh.
//
// Reads one JSON job on stdin:
//   {"records": {"sel._domainkey.example.com": "v=DKIM1; k=rsa; p=..."},
//    "messages": {"name": "/path/to/message.eml", ...},
//    "now": 1700000000000}            // optional: verification time, ms
// and writes {"name": [{"result": "pass", "domain": ..., "selector": ...,
// "algorithm": ..., "comment": ...}, ...], ...} on stdout: one entry per
// DKIM-Signature of each message, in the order mailauth reports them.
//
// Public keys come only from the job: the resolver below never touches DNS,
// and any other name fails with ENOTFOUND.
import { readFileSync } from 'node:fs';
import verifyModule from 'mailauth/lib/dkim/verify.js';

const { dkimVerify } = verifyModule;

function readStdin() {
    return readFileSync(0, 'utf8');
}

function splitTxt(text) {
    // a TXT record is a list of strings of at most 255 octets each
    const parts = [];
    for (let i = 0; i < text.length; i += 255) {
        parts.push(text.slice(i, i + 255));
    }
    return parts;
}

async function main() {
    const job = JSON.parse(readStdin());
    const records = job.records || {};
    const resolver = async (name, rrtype) => {
        const key = name.replace(/\.$/, '').toLowerCase();
        if (rrtype === 'TXT' && Object.prototype.hasOwnProperty.call(records, key)) {
            return [splitTxt(records[key])];
        }
        const err = new Error(`queryTxt ENOTFOUND ${name}`);
        err.code = 'ENOTFOUND';
        throw err;
    };
    const out = {};
    for (const [name, path] of Object.entries(job.messages)) {
        const message = readFileSync(path);
        const options = { resolver };
        if (job.now) {
            options.curTime = new Date(job.now);
        }
        const res = await dkimVerify(message, options);
        out[name] = res.results.map(r => ({
            result: r.status && r.status.result,
            comment: (r.status && r.status.comment) || '',
            domain: r.signingDomain,
            selector: r.selector,
            algorithm: r.algo,
            canonicalization: r.format,
            info: r.info
        }));
    }
    process.stdout.write(JSON.stringify(out));
}

main().catch(err => {
    process.stderr.write(`verify.mjs: ${err && err.stack ? err.stack : err}\n`);
    process.exit(2);
});
