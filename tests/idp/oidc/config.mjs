// The instance configuration shared by provider.mjs, mint.mjs and the Rust helpers
// (tests/common/idp.rs): one JSON file, mode 0600, in the test's temporary directory.
//
//   node config.mjs new FILE --port PORT [--access-token-ttl SECONDS] [--resource URI]
//   node config.mjs rotate-key FILE [--keep-old]
//
// Shape (every secret random per instance, nothing committed):
//   { "issuer": "http://127.0.0.1:PORT", "port": PORT,
//     "access_token_ttl": SECONDS, "resource": "urn:xmpp",
//     "jwks": { "keys": [ <private RSA JWK, alg RS256, fresh kid>, ... ] },
//     "cookie_keys": [ ... ],
//     "clients": { "broker":  { "client_id", "client_secret" },                  // introspection
//                  "app":     { "client_id", "client_secret", "redirect_uri" },  // code + refresh
//                  "machine": { "client_id": "bob", "client_secret" } } }         // client credentials
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';

/** A random URL-safe string of `bytes` bytes of entropy. */
export const randomString = (bytes) => randomBytes(bytes).toString('base64url');

/** A fresh RS256 signing key as a private JWK with a random `kid`. */
export function newSigningKey() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { ...privateKey.export({ format: 'jwk' }), kid: randomString(12), alg: 'RS256', use: 'sig' };
}

/** A new configuration for a provider listening on 127.0.0.1:`port`. */
export function newConfig({ port, accessTokenTtl = 3600, resource = 'urn:xmpp' }) {
  const issuer = `http://127.0.0.1:${port}`;
  return {
    issuer,
    port,
    access_token_ttl: accessTokenTtl,
    resource,
    jwks: { keys: [newSigningKey()] },
    cookie_keys: [randomString(32)],
    clients: {
      broker: { client_id: 'xmpp-broker', client_secret: randomString(24) },
      // Never followed: mint.mjs reads the code from the redirect's Location header.
      app: { client_id: 'xmpp-app', client_secret: randomString(24), redirect_uri: `${issuer}/callback` },
      // Named after account bob on purpose: its tokens carry sub = bob and name no user.
      machine: { client_id: 'bob', client_secret: randomString(24) },
    },
  };
}

export function readConfig(file) {
  return JSON.parse(readFileSync(file, 'utf8'));
}

/** Writes `config` to `file` (0600) through a temporary name, so readers never see half a file. */
export function writeConfig(file, config) {
  const tmp = `${file}.${process.pid}.tmp`;
  writeFileSync(tmp, `${JSON.stringify(config, null, 2)}\n`, { mode: 0o600 });
  renameSync(tmp, file);
}

/**
 * Puts a new signing key first (oidc-provider signs with the first key of an algorithm); with
 * `keepOld` the previous keys stay published so tokens they signed still verify.
 */
export function rotateKey(config, { keepOld = false } = {}) {
  const keys = [newSigningKey(), ...(keepOld ? config.jwks.keys : [])];
  return { ...config, jwks: { keys } };
}

function main(argv) {
  const { positionals: [command, file], values } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      port: { type: 'string' },
      'access-token-ttl': { type: 'string' },
      resource: { type: 'string' },
      'keep-old': { type: 'boolean' },
    },
  });
  if (command === 'new' && file && values.port) {
    writeConfig(file, newConfig({
      port: Number(values.port),
      accessTokenTtl: values['access-token-ttl'] ? Number(values['access-token-ttl']) : undefined,
      resource: values.resource,
    }));
  } else if (command === 'rotate-key' && file) {
    writeConfig(file, rotateKey(readConfig(file), { keepOld: values['keep-old'] }));
  } else {
    throw new Error('usage: config.mjs new FILE --port PORT [--access-token-ttl S] [--resource URI] | rotate-key FILE [--keep-old]');
  }
}

if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  try {
    main(process.argv.slice(2));
  } catch (err) {
    console.error(`config.mjs: ${err.message}`);
    process.exit(2);
  }
}
