"""Keys and roles: every TCP connection to a broker is CURVE-encrypted and authenticated.

A broker has a CURVE key pair, kept in its state folder (0600). It hands out two kinds of credential:
  API key        bk1-<broker public key>-<secret>   for clients (`burla login`, api_key=, BURLA_API_KEY)
  worker token   bw1-<broker public key>-<secret>   for `burla worker` ($BURLA_WORKER_TOKEN or --token-file)
  slot key       bs1-<broker public key>-<secret>   made by a worker for each executor it starts, and announced
                 to the broker (SLOT_KEY): an executor, which runs user code, never holds the worker token, and its
                 key speaks only for its own slot until the slot's next executor replaces it
A credential carries everything a peer needs: the broker's public key (so the peer knows it talks to the right
broker) and a secret from which the peer's own CURVE key pair is derived. The broker derives the same public keys
from the credentials it issued, and its ZAP handler admits only those, naming each connection's role in its
User-Id: "worker", "slot:<slot name>", or "client:<8 hex>" per API key. The broker checks every message against
its sender's role.
"""

import hashlib
import os
import pathlib

import zmq
from zmq.utils import z85

CLIENT, WORKER, SLOT = "bk1", "bw1", "bs1"


def _derive(kind, secret):
    seed = hashlib.blake2b(secret, digest_size=32, person=kind.encode()).digest()
    secret_key = z85.encode(seed)
    return zmq.curve_public(secret_key), secret_key


def new_credential(kind, broker_public):
    return f"{kind}-{z85.decode(broker_public).hex()}-{os.urandom(32).hex()}"


def parse(credential, kind):
    """credential -> (broker public key, own public key, own secret key), all z85; ValueError if malformed."""
    name, shape = NAMES[kind], f"{kind}-<key id>-<secret>"
    where = {CLIENT: " as `burla broker` prints it (or `burla broker --new-api-key`)",
             WORKER: " as `burla broker` prints it (BURLA_WORKER_TOKEN=...)"}.get(kind, "")
    if not isinstance(credential, str):
        raise ValueError(f"not a burla credential: {name} is a string, {shape}")
    parts = credential.strip().split("-")
    if len(parts) != 3:
        raise ValueError(f"not a burla credential: {name} looks like {shape}{where}, three parts joined by '-'; "
                         f"this one has {len(parts)} part{'' if len(parts) == 1 else 's'}")
    prefix, broker_hex, secret_hex = parts
    if prefix != kind:
        other = {k: n for k, n in NAMES.items() if k != kind}.get(prefix)
        raise ValueError(f"not {name}: " + (f"this is {other} ({prefix}-...)" if other else
                                             f"it starts with {prefix[:8]!r}, not {kind}") + f"; expected {shape}")
    wrong = []
    for part, text in (("key id", broker_hex), ("secret", secret_hex)):  # (the secret is never echoed)
        if len(text) != 64:
            wrong.append(f"its {part} has {len(text)} character{'' if len(text) == 1 else 's'}, not 64")
        elif not all(c in "0123456789abcdefABCDEF" for c in text):
            wrong.append(f"its {part} is not all hexadecimal digits")
    if wrong:
        raise ValueError(f"not {name}: expected {shape}{where}, the key id and the secret 64 hexadecimal digits "
                         "each; " + "; ".join(wrong))
    broker_public = z85.encode(bytes.fromhex(broker_hex))
    public, secret_key = _derive(kind, bytes.fromhex(secret_hex))
    return broker_public, public, secret_key


NAMES = {CLIENT: "an API key", WORKER: "a worker token", SLOT: "a slot key"}


def secure(sock, credential, kind):
    """Make a DEALER socket speak CURVE to the broker named in the credential (call before connect)."""
    broker_public, public, secret = parse(credential, kind)
    sock.curve_serverkey = broker_public
    sock.curve_publickey = public
    sock.curve_secretkey = secret


class BrokerKeys:
    """The broker's key pair and the credentials it has issued, kept in a private folder."""

    def __init__(self, folder):
        self.folder = pathlib.Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)
        secret_file = self.folder / "broker.secret"
        if not secret_file.exists():
            public, secret = zmq.curve_keypair()
            write_private(secret_file, secret.decode())
        self.secret = secret_file.read_text().strip().encode()
        self.public = zmq.curve_public(self.secret)
        self.api_keys = self.issued("api_keys", CLIENT)
        self.worker_tokens = self.issued("worker_tokens", WORKER)
        self.slot_roles = {}  # slot key (z85 public) -> "slot:<name>", as workers announce them
        self.slot_keys = {}  # slot name -> its current key

    def admit_slot(self, name, public):
        """Admit the key of a slot's next executor (and no longer its previous one's). The role names the key's
        generation, so messages over a connection made with an older key are refused too."""
        old = self.slot_keys.pop(name, None)
        if old is not None:
            self.slot_roles.pop(old, None)
        self.slot_keys[name] = public
        self.slot_roles[public] = f"slot:{name}#{public[:10].decode()}"

    def current_slot_key(self, name, generation):
        key = self.slot_keys.get(name)
        return key is not None and key[:10].decode() == generation

    def revoke_slots(self, prefix):
        for name in [n for n in self.slot_keys if n.startswith(prefix)]:
            self.slot_roles.pop(self.slot_keys.pop(name), None)

    def api_key_of(self, role):
        """The API key of a client role, handed to the executors serving it so nested calls run as the same user
        (an executor serves one owner only)."""
        for key in self.api_keys:
            if role == client_role(key):
                return key
        return None

    def issued(self, name, kind):
        path = self.folder / name
        if not path.exists():
            write_private(path, new_credential(kind, self.public) + "\n")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]

    def add_api_key(self):
        key = new_credential(CLIENT, self.public)
        with open(self.folder / "api_keys", "a") as f:
            f.write(key + "\n")
        self.api_keys.append(key)
        return key

    def roles(self):
        """CURVE public key (z85) -> role, for every credential issued by this broker."""
        roles = {}
        for key in self.api_keys:
            roles[parse(key, CLIENT)[1]] = client_role(key)
        for token in self.worker_tokens:
            roles[parse(token, WORKER)[1]] = "worker"
        return roles

    def serve(self, ctx, sock):
        """Make the broker's ROUTER a CURVE server and start the ZAP handler that admits our credentials."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True
        auth = _authenticator(ctx, self)
        auth.start()
        auth.configure_curve_callback("*", credentials_provider=auth)
        return auth


    def reload(self):
        self.api_keys = self.issued("api_keys", CLIENT)
        self.worker_tokens = self.issued("worker_tokens", WORKER)
        return self.roles()


def client_role(api_key):
    return "client:" + hashlib.blake2b(api_key.encode(), digest_size=4).hexdigest()


def slot_credential(token):
    """A fresh slot key for an executor of the worker holding this token: (credential, its public key z85)."""
    broker_public = parse(token, WORKER)[0]
    credential = new_credential(SLOT, broker_public)
    return credential, parse(credential, SLOT)[1]


def _authenticator(ctx, keys):
    """A ZAP handler admitting the credentials we issued. (zmq.auth.thread brings asyncio: imported only in the
    broker, so executors, which start often, do not pay for it.)"""
    from zmq.auth.thread import ThreadAuthenticator

    class Authenticator(ThreadAuthenticator):
        def __init__(self):
            super().__init__(ctx)
            self.roles = keys.roles()

        def callback(self, domain, key):  # the credentials provider: is this public key one we issued?
            if key in keys.slot_roles:
                return True
            if key not in self.roles:
                self.roles = keys.reload()  # a key issued (burla broker --new-api-key) since we started
            return key in self.roles

        def curve_user_id(self, client_public_key):
            key = z85.encode(client_public_key)
            return keys.slot_roles.get(key) or self.roles.get(key, "denied")

    return Authenticator()


def hide_process():
    """Make this process undumpable (Linux): its /proc files (environ, memory) then belong to root, so code of
    the same user, such as a call running in an executor, cannot read the worker token from them."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    except (OSError, AttributeError):
        pass


def write_private(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
