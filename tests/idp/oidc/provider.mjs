// panva/oidc-provider on loopback, configured for extauth-broker's tests.
//
//   node provider.mjs CONFIG      (CONFIG written by `node config.mjs new`)
//
// Listens on 127.0.0.1:<config.port> until killed; prints "listening <issuer>" once ready.
// Features: introspection, revocation, clientCredentials, resourceIndicators (config.resource
// -> JWT access tokens, `typ: at+jwt`, aud = the resource), devInteractions (scripted login and
// consent, see mint.mjs). Accounts: tests/idp/accounts.json (account id = sub = username).
// Storage is the library's in-memory adapter: a restart forgets every grant and opaque token.
import { readFileSync } from 'node:fs';

import Provider, { errors } from 'oidc-provider';

import { readConfig } from './config.mjs';

/** The accounts of tests/idp/accounts.json, by account id (= username). */
function accountsById() {
  const file = new URL('../accounts.json', import.meta.url);
  return new Map(JSON.parse(readFileSync(file, 'utf8')).accounts.map((a) => [a.username, a]));
}

/** The one resource server: JWT access tokens for `resource`, scope `xmpp`. */
function resourceServer(config) {
  return {
    scope: 'xmpp',
    audience: config.resource,
    accessTokenFormat: 'jwt',
    accessTokenTTL: config.access_token_ttl,
    jwt: { sign: { alg: 'RS256' } },
  };
}

function providerConfiguration(config) {
  const accounts = accountsById();
  const { broker, app, machine } = config.clients;
  const ttl = config.access_token_ttl;
  return {
    clients: [
      {
        client_id: broker.client_id,
        client_secret: broker.client_secret,
        grant_types: [],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_basic',
      },
      {
        client_id: app.client_id,
        client_secret: app.client_secret,
        grant_types: ['authorization_code', 'refresh_token'],
        response_types: ['code'],
        redirect_uris: [app.redirect_uri],
        token_endpoint_auth_method: 'client_secret_basic',
      },
      {
        client_id: machine.client_id,
        client_secret: machine.client_secret,
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_basic',
      },
    ],
    async findAccount(ctx, id) {
      if (!accounts.has(id)) return undefined;
      return { accountId: id, async claims() { return { sub: id, preferred_username: id }; } };
    },
    claims: { openid: ['sub'], profile: ['preferred_username'] },
    scopes: ['openid', 'offline_access', 'profile'],
    // Access tokens (JWT, and opaque ones at introspection) name their user the way userinfo
    // does, and carry the account's XMPP domain when it has one, as a claim a deployment's
    // mapper would add for brokers serving several domains (`domain_claim`).
    async extraTokenClaims(ctx, token) {
      const account = token.accountId && accounts.get(token.accountId);
      if (!account) return undefined;
      const domain = account.xmpp_domain ? { xmpp_domain: account.xmpp_domain } : {};
      return { preferred_username: account.username, ...domain };
    },
    features: {
      devInteractions: { enabled: true },
      introspection: { enabled: true },
      revocation: { enabled: true },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        async getResourceServerInfo(ctx, resource) {
          if (resource !== config.resource) throw new errors.InvalidTarget();
          return resourceServer(config);
        },
      },
    },
    jwks: config.jwks,
    cookies: { keys: config.cookie_keys },
    // Every lifetime set, so the library does not warn about its defaults on each request.
    ttl: {
      AccessToken: ttl,
      ClientCredentials: ttl,
      IdToken: ttl,
      RefreshToken: 86400,
      Grant: 86400,
      Session: 86400,
      Interaction: 600,
    },
  };
}

const file = process.argv[2];
if (!file) {
  console.error('usage: provider.mjs CONFIG');
  process.exit(2);
}
const config = readConfig(file);
const provider = new Provider(config.issuer, providerConfiguration(config));
// Errors a client caused (bad credentials, unknown tokens) are answered, not crashes; log only
// their names: request bodies carry tokens and secrets.
provider.on('server_error', (ctx, err) => console.error(`server_error: ${err.name}: ${err.message}`));
const server = provider.listen(config.port, '127.0.0.1', () => console.log(`listening ${config.issuer}`));
server.on('error', (err) => {
  console.error(`provider.mjs: ${err.message}`);
  process.exit(1);
});
