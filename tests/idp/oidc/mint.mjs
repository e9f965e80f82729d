// Tokens from a running provider.mjs, over plain HTTP as a real client gets them.
//
//   node mint.mjs CONFIG user ACCOUNT            -> {"opaque", "jwt", "id_token", "refresh_token"}
//   node mint.mjs CONFIG client-credentials [RESOURCE]  -> the token response of client `bob`
//   node mint.mjs CONFIG revoke < TOKEN          -> {"client_id": <the client that held it>}
//
// `user` runs the authorization code flow (PKCE S256) of the `app` client with scopes
// `openid profile offline_access xmpp` and resource config.resource, logging in and consenting
// through devInteractions' forms. The code exchange names no resource, so its access token is
// the opaque one for userinfo (/me); the refresh token exchange names the resource and returns
// the JWT access token (aud = the resource). Prints one JSON object; on failure prints the step
// and the provider's status and error (never a token or secret) on stderr and exits 1.
import { createHash, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';

import { readConfig } from './config.mjs';

class StepError extends Error {}

const basic = ({ client_id: id, client_secret: secret }) => `Basic ${Buffer.from(
  `${encodeURIComponent(id)}:${encodeURIComponent(secret)}`,
).toString('base64')}`;

/** A tiny cookie jar: the interaction cookies are scoped to paths the flow visits in order. */
class Jar {
  #cookies = new Map();

  store(response) {
    for (const line of response.headers.getSetCookie()) {
      const [pair] = line.split(';');
      const eq = pair.indexOf('=');
      this.#cookies.set(pair.slice(0, eq).trim(), pair.slice(eq + 1));
    }
  }

  header() {
    return [...this.#cookies].map(([k, v]) => `${k}=${v}`).join('; ');
  }
}

/** The provider's error answer, without anything the request carried. */
async function describe(response) {
  let body = '';
  try {
    const json = await response.json();
    body = [json.error, json.error_description].filter(Boolean).join(': ');
  } catch {
    body = '(not JSON)';
  }
  return `HTTP ${response.status} ${body}`;
}

async function tokenRequest(config, client, form, step) {
  const response = await fetch(`${config.issuer}/token`, {
    method: 'POST',
    headers: { authorization: basic(client), 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams(form),
  });
  if (!response.ok) throw new StepError(`${step}: ${await describe(response)}`);
  return response.json();
}

/** GET or POST `url` without following redirects; returns the response. */
async function visit(jar, url, form) {
  const response = await fetch(url, {
    method: form ? 'POST' : 'GET',
    redirect: 'manual',
    headers: {
      cookie: jar.header(),
      ...(form ? { 'content-type': 'application/x-www-form-urlencoded' } : {}),
    },
    body: form ? new URLSearchParams(form) : undefined,
  });
  jar.store(response);
  return response;
}

/**
 * Follows redirects from `url` until one leaves the provider (the client's redirect_uri) or a
 * page answers 200 (an interaction form). Returns that final URL.
 */
async function follow(config, jar, url, form) {
  let response = await visit(jar, url, form);
  let current = url;
  for (let hops = 0; hops < 10; hops += 1) {
    if (response.status === 200) return new URL(current);
    const location = response.headers.get('location');
    if (response.status < 300 || response.status >= 400 || !location) {
      throw new StepError(`${new URL(current).pathname}: ${await describe(response)}`);
    }
    current = new URL(location, current).href;
    if (current.startsWith(config.clients.app.redirect_uri)) return new URL(current);
    response = await visit(jar, current);
  }
  throw new StepError('too many redirects');
}

/** Authorization code flow for `account`, then a refresh for the resource. */
async function userTokens(config, account) {
  const app = config.clients.app;
  const verifier = randomBytes(32).toString('base64url');
  const auth = new URL(`${config.issuer}/auth`);
  auth.search = new URLSearchParams({
    client_id: app.client_id,
    response_type: 'code',
    redirect_uri: app.redirect_uri,
    scope: 'openid profile offline_access xmpp',
    resource: config.resource,
    prompt: 'consent',
    state: randomBytes(8).toString('hex'),
    code_challenge: createHash('sha256').update(verifier).digest('base64url'),
    code_challenge_method: 'S256',
  });
  const jar = new Jar();
  let at = await follow(config, jar, auth.href);
  at = await follow(config, jar, at.href, { prompt: 'login', login: account, password: 'any' });
  at = await follow(config, jar, at.href, { prompt: 'consent' });
  const code = at.searchParams.get('code');
  if (!code) {
    throw new StepError(`authorization: ${at.searchParams.get('error')}: ${at.searchParams.get('error_description')}`);
  }
  const issued = await tokenRequest(config, app, {
    grant_type: 'authorization_code', code, redirect_uri: app.redirect_uri, code_verifier: verifier,
  }, 'code exchange');
  const refreshed = await tokenRequest(config, app, {
    grant_type: 'refresh_token', refresh_token: issued.refresh_token, resource: config.resource,
  }, 'refresh for the resource');
  return {
    opaque: issued.access_token,
    jwt: refreshed.access_token,
    id_token: issued.id_token,
    refresh_token: refreshed.refresh_token ?? issued.refresh_token,
  };
}

async function clientCredentials(config, resource) {
  const form = { grant_type: 'client_credentials', ...(resource ? { resource, scope: 'xmpp' } : {}) };
  return tokenRequest(config, config.clients.machine, form, 'client credentials');
}

async function postForm(config, path, client, form, step) {
  const response = await fetch(`${config.issuer}${path}`, {
    method: 'POST',
    headers: { authorization: basic(client), 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams(form),
  });
  if (!response.ok) throw new StepError(`${step}: ${await describe(response)}`);
  return response;
}

/**
 * Revokes `token` as the client it was issued to (oidc-provider refuses to revoke another
 * client's token): introspection as the broker tells which one.
 */
async function revoke(config, token) {
  const info = await (await postForm(config, '/token/introspection', config.clients.broker, { token }, 'introspection')).json();
  if (!info.active) throw new StepError('revoke: the token is not active (unknown, expired, or a JWT)');
  const owner = Object.values(config.clients).find((c) => c.client_id === info.client_id);
  if (!owner) throw new StepError(`revoke: issued to an unknown client ${info.client_id}`);
  await postForm(config, '/token/revocation', owner, { token }, 'revocation');
  return { client_id: info.client_id };
}

async function main([file, command, arg]) {
  const config = readConfig(file);
  switch (command) {
    case 'user':
      if (!arg) break;
      return userTokens(config, arg);
    case 'client-credentials':
      return clientCredentials(config, arg);
    case 'revoke':
      return revoke(config, readFileSync(0, 'utf8').trim());
    default:
  }
  throw new StepError('usage: mint.mjs CONFIG user ACCOUNT | client-credentials [RESOURCE] | revoke < TOKEN');
}

try {
  console.log(JSON.stringify(await main(process.argv.slice(2))));
} catch (err) {
  console.error(`mint.mjs: ${err instanceof StepError ? err.message : err.stack}`);
  process.exit(1);
}
