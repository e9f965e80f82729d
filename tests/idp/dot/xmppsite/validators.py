"""The site's OAuth2Validator: stock DOT userinfo answers only {"sub": "<database id>"}."""
from oauth2_provider.oauth2_validators import OAuth2Validator


class XmppSiteValidator(OAuth2Validator):
    """Adds the Django username to userinfo and ID tokens, as a site that wants XMPP logins does.

    `preferred_username` is the OIDC standard claim (scope `profile`); `username` is the name
    RFC 7662 introspection uses for the same value, given under the same scope so both answers
    can name the user the same way.
    """

    oidc_claim_scope = {**OAuth2Validator.oidc_claim_scope, "username": "profile"}

    def get_additional_claims(self, request):
        name = request.user.get_username()
        return {"preferred_username": name, "username": name}
