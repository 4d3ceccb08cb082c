"""Writes redaction_labelled.jsonl: the labelled examples for tests/test_traces_redact.py.

Run once (`python tests/data/make_redaction_set.py`); the output is committed so the
labels stay fixed. Each line: {"text", "secrets": [{"kind", "value"}], "source"}. A
positive is detected when every secret value is gone from the redacted text and a
placeholder of its kind took its place; a negative must come out unchanged.
"""

import base64
import json
import random
import string
from pathlib import Path

rng = random.Random(20261123)
ALNUM = string.ascii_letters + string.digits
cases = []


def rand(alphabet, k):
    return "".join(rng.choice(alphabet) for _ in range(k))


def add(template, kind, value, source="generated"):
    cases.append({"text": template.format(v=value), "secrets": [{"kind": kind, "value": value}], "source": source})


def luhn(prefix, length):
    body = prefix + rand(string.digits, length - len(prefix) - 1)
    for c in string.digits:
        s = body + c
        total = 0
        for i, ch in enumerate(reversed(s)):
            d = int(ch)
            if i % 2:
                d = d * 2 - 9 if d > 4 else d * 2
            total += d
        if total % 10 == 0:
            return s


contexts = [
    "{v}", "Contact: {v}", "please send it to {v} asap", '{{"user": "x", "value": "{v}"}}', "value={v}\n",
    "- {v}", "Here you go: {v}.", "(see {v})", "`{v}`", "Hi,\n\nmy details: {v}\n\nthanks",
]

# e-mail addresses
locals_ = ["john.smith", "a_b-c+tag", "JANE", "x", "maria.garcia42", "dev-ops", "first.last", "info", "k.tanaka"]
domains = ["example.org", "sub.domain.co.uk", "CORP.COM", "mail.io", "gmail.com", "uni-bonn.de", "startup.ai",
           "company.net", "yahoo.fr", "outlook.com"]
for i in range(30):
    add(rng.choice(contexts + ["mailto:{v}", "<{v}>", "From: Jane Doe <{v}>"]), "email",
        f"{rng.choice(locals_)}@{rng.choice(domains)}")

# phone numbers
areas = ["212", "310", "415", "617", "646", "702", "206", "312", "503", "512", "305", "404", "720"]
for i in range(12):
    a, ex, ln = rng.choice(areas), str(rng.randint(201, 989)), f"{rng.randint(0, 9999):04d}"
    fmt = rng.choice(["({a}) {e}-{l}", "{a}-{e}-{l}", "{a}.{e}.{l}", "+1 {a} {e} {l}", "+1-{a}-{e}-{l}", "1-{a}-{e}-{l}"])
    add(rng.choice(contexts[:8] + ["call me at {v}", "Phone: {v}", "tel. {v}"]), "phone", fmt.format(a=a, e=ex, l=ln))
for value in ["+44 20 7946 0958", "+49 30 901820", "+33 1 42 68 53 00", "+91 98765 43210", "+81 3-1234-5678",
              "+61 2 9374 4000", "+34 912 34 56 78", "+55 11 91234-5678"]:
    add(rng.choice(["call me at {v}", "My number is {v}.", "WhatsApp: {v}", "tel {v}"]), "phone", value)
for _ in range(4):
    add("you can call me at {v} after 6pm", "phone", f"{rng.choice(areas)}{rng.randint(201, 989)}{rng.randint(0, 9999):04d}")

# payment cards (Luhn-valid, real issuer prefixes)
for prefix, length, groups in [("4", 16, (4, 4, 4, 4)), ("51", 16, (4, 4, 4, 4)), ("55", 16, (4, 4, 4, 4)),
                               ("2221", 16, (4, 4, 4, 4)), ("34", 15, (4, 6, 5)), ("37", 15, (4, 6, 5)),
                               ("6011", 16, (4, 4, 4, 4)), ("3530", 16, (4, 4, 4, 4))]:
    for sep in (" ", "-"):
        number = luhn(prefix, length)
        parts, i = [], 0
        for g in groups:
            parts.append(number[i:i + g])
            i += g
        add(rng.choice(["card: {v}", "My card number is {v}", "{v} exp 04/27", "pay with {v} please"]), "credit_card",
            sep.join(parts))
    add(rng.choice(["credit card {v}", "Visa: {v}", "card number {v} cvv 123"]), "credit_card", luhn(prefix, length))

# IP addresses (globally routable)
for _ in range(12):
    first = rng.choice([8, 23, 34, 45, 52, 64, 81, 91, 104, 142, 151, 185, 203 - 100, 212])
    ip = f"{first}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    add(rng.choice(["ssh root@{v}", "server ip is {v}", "GET / from {v}", "host: {v}:8080", "ping {v}"]), "ip_address", ip)
for ip in ["2a00:1450:4001:81c::200e", "2606:4700:4700::1111", "2001:4860:4860::8888", "2a03:2880:f10c:83:face:b00c:0:25de"]:
    add(rng.choice(["connect to [{v}]:443", "AAAA record {v}", "my ipv6 is {v}"]), "ip_address", ip)

# API keys and tokens
for _ in range(6):
    add(rng.choice(['OPENAI_API_KEY="{v}"', "openai.api_key = '{v}'", "my key is {v}", "{v}"]), "openai_key",
        "sk-proj-" + rand(ALNUM + "_-", rng.choice([48, 100, 156])))
for _ in range(3):
    add("export OPENAI_API_KEY={v}", "openai_key", "sk-" + rand(ALNUM, 20) + "T3BlbkFJ" + rand(ALNUM, 20))
for _ in range(3):
    add("api key: {v}", "openai_key", "sk-" + rand(ALNUM, 48))
for _ in range(5):
    add(rng.choice(["ANTHROPIC_API_KEY={v}", "x-api-key: {v}", "client = Anthropic(api_key=\"{v}\")"]), "anthropic_key",
        "sk-ant-api03-" + rand(ALNUM + "_-", 95))
for _ in range(6):
    add(rng.choice(["aws_access_key_id = {v}", "AWS_ACCESS_KEY_ID={v}", "key {v}"]), "aws_access_key",
        rng.choice(["AKIA", "ASIA"]) + rand(string.ascii_uppercase + string.digits, 16))
for _ in range(3):
    add('aws_secret_access_key = "{v}"', "aws_secret_key", rand(ALNUM + "/+", 40))
for _ in range(5):
    add(rng.choice(["git clone https://{v}@github.com/org/repo", "GITHUB_TOKEN={v}", "token: {v}"]), "github_token",
        rng.choice(["ghp_", "gho_", "ghs_"]) + rand(ALNUM, 36))
for _ in range(3):
    add("GH_TOKEN={v}", "github_token", "github_pat_" + rand(ALNUM, 22) + "_" + rand(ALNUM, 59))
for _ in range(3):
    add("CI token {v}", "gitlab_token", "glpat-" + rand(ALNUM + "_-", 20))
for _ in range(4):
    add(rng.choice(["SLACK_BOT_TOKEN={v}", "slack token: {v}"]), "slack_token",
        f"xoxb-{rng.randint(10**11, 10**12 - 1)}-{rng.randint(10**12, 10**13 - 1)}-{rand(string.ascii_lowercase + string.digits, 24)}")
add("post to {v}", "slack_token", f"https://hooks.slack.com/services/T{rand(ALNUM, 8)}/B{rand(ALNUM, 8)}/{rand(ALNUM, 24)}")


def b64(obj):
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


for _ in range(5):
    jwt = b64({"alg": "HS256", "typ": "JWT"}) + "." + b64({"sub": str(rng.randint(1, 10**9)), "name": "X", "iat": 1516239022}) \
        + "." + rand(ALNUM + "_-", 43)
    add(rng.choice(["token={v}", "Cookie: session={v}", "the jwt is {v}"]), "jwt", jwt)
for _ in range(6):
    add(rng.choice(["Authorization: Bearer {v}", "curl -H 'Authorization: Bearer {v}' https://api.x.com",
                    "headers = {{'Authorization': 'Bearer {v}'}}"]), "bearer_token", rand(ALNUM + "._-", rng.choice([32, 40, 64])))
for _ in range(3):
    add("STRIPE_SECRET_KEY={v}", "stripe_key", "sk_live_" + rand(ALNUM, 24))
add("SENDGRID_API_KEY={v}", "sendgrid_key", "SG." + rand(ALNUM + "_-", 22) + "." + rand(ALNUM + "_-", 43))
for _ in range(4):
    add(rng.choice(['api_key = "{v}"', 'client_secret: {v}', '"secret_key": "{v}"', "PASSWORD={v}"]), "secret",
        rand(ALNUM, rng.choice([16, 24, 32])) + rng.choice(string.digits))
for _ in range(3):
    add("DATABASE_URL=postgres://app:{v}@db.internal:5432/app", "url_password", rand(ALNUM, 14) + "9")
for kind in ("RSA PRIVATE KEY", "PRIVATE KEY", "OPENSSH PRIVATE KEY", "EC PRIVATE KEY"):
    body = "\n".join(rand(ALNUM + "+/", 64) for _ in range(6))
    key = f"-----BEGIN {kind}-----\n{body}\n-----END {kind}-----"
    add("here is my key, why does ssh reject it?\n{v}\n", "private_key", key)

# Hand-written realistic mixes (several secrets in one text).
hand = [
    ("Hi, I'm Dana (dana.k@fastmail.com, +1 617 555 0188). My AWS key AKIAQ7XK3MZ4PL2N8RTW stopped working.",
     [("email", "dana.k@fastmail.com"), ("phone", "+1 617 555 0188"), ("aws_access_key", "AKIAQ7XK3MZ4PL2N8RTW")]),
    ("import openai\nopenai.api_key = \"sk-proj-4fJ9kL2mN8pQ1rS5tU7vW3xY6zA0bC4dE8fG2hI6jK9lM1nO5pQ\"\nprint(openai.models.list())",
     [("openai_key", "sk-proj-4fJ9kL2mN8pQ1rS5tU7vW3xY6zA0bC4dE8fG2hI6jK9lM1nO5pQ")]),
    ("curl https://api.example.com/v1/items -H \"Authorization: Bearer 9f8e7d6c5b4a39281706f5e4d3c2b1a0\"",
     [("bearer_token", "9f8e7d6c5b4a39281706f5e4d3c2b1a0")]),
    ("The nginx logs show 203.0.113.7 (test) and a real client 81.2.69.142 hitting /login.",
     [("ip_address", "81.2.69.142")]),
    ("Please charge my Mastercard 5425 2334 3010 9903, billing address is on file.",
     [("credit_card", "5425 2334 3010 9903")]),
]
for text, secrets in hand:
    cases.append({"text": text, "secrets": [{"kind": k, "value": v} for k, v in secrets], "source": "hand"})

# Negatives: ordinary code and prose that must come out unchanged.
negatives = [
    "def reverse(s: str) -> str:\n    return s[::-1]\n",
    "y = x@self.weight.T + self.bias",
    "for i in range(1, 10):\n    print(i * 3.14159)\n",
    "x[1::2] = arr[::3]",
    "git clone git@github.com:huggingface/transformers.git",
    "The meeting is at 10:30:45 on 2023-10-15, room 4B.",
    "Version 1.2.3 was released; upgrade from 1.1.9 with pip install -U pkg==1.2.3",
    "Bind the server to 0.0.0.0:8000 or 127.0.0.1:8000 for local tests; the router is 192.168.1.1.",
    "The subnet mask 255.255.255.0 allows 254 hosts.",
    "std::vector<int> v; v.push_back(42); std::cout << v[0] << std::endl;",
    "SELECT id, email FROM users WHERE created_at > '2024-01-01' LIMIT 100;",
    "const token = process.env.API_TOKEN; fetch(url, { headers: { Authorization: `Bearer ${token}` } })",
    "headers = {'Authorization': f'Bearer {api_key}'}",
    "Set OPENAI_API_KEY to your key (it starts with sk-) before running.",
    "api_key = os.environ['OPENAI_API_KEY']",
    "password = getpass.getpass('Password: ')",
    "The sequence 1 2 3 4 5 6 7 8 9 10 sums to 55.",
    "Input:\n5\n2310 7571 7732 1862 13 14\nOutput:\n3",
    "The answer is 4155550132 / 2 = 2077775066.",
    "sqrt(5) = 2.236067977..., and pi is 3.14159265358979.",
    "A 16-digit number such as 1234567812345678 is not always a card.",
    "The population grew from 331,449,281 to 333,287,557 people.",
    "Timestamp 1700000000 corresponds to November 2023.",
    "The ISBN is 978-3-16-148410-0.",
    "Call the function foo(bar=1, baz='qux') and return its value.",
    "He wrote to the editor at the local newspaper and never heard back.",
    "Our new office is on 5th Avenue; the phone line will be installed next week.",
    "df.groupby('user_id')['amount'].sum().sort_values(ascending=False).head(10)",
    "ssh -i ~/.ssh/id_rsa ubuntu@ec2-instance",
    "Use sk-learn (scikit-learn) for the classifier; sk-learn-pipeline-for-classification is a common name.",
    "The bearer of this letter is my cousin.",
    "token = tokenizer.encode('hello world')",
    "secret_santa = assign_pairs(participants)",
    "The model reached 87.5% accuracy after 12 epochs (loss 0.3421).",
    "Ports 8080, 8443 and 9090 must be open.",
    "Coordinates: 48.8584, 2.2945 (Eiffel Tower).",
    "UUID 123e4567-e89b-12d3-a456-426614174000 identifies the record.",
    "sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d08c15d0a08",
    "commit a94a8fe5ccb19ba61c4c0873d391e987982fbbd3 fixed the bug",
    "matrix = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]",
    "The train leaves at 7:45 and arrives at 13:20, a 5 h 35 min trip.",
    "He scored 1,234,567 points in the arcade game.",
    "while (i < n && arr[i] != target) { i++; }",
    "The formula is E = mc^2, where c = 299792458 m/s.",
    "Order #4831-2295-7710 has shipped.",
    "Email me when you're done (I'll be on the team channel).",
    "The @property decorator turns a method into a read-only attribute.",
    "Use user@localhost only for local testing.",
    "Temperatures ranged from -12.5 to 38.4 degrees.",
    "My password must be at least 12 characters, according to the policy.",
    "-----BEGIN CERTIFICATE-----\nMIIBIjANBgkq\n-----END CERTIFICATE-----",
    "The private key should never be committed; store it in a vault.",
    "Write a regex that matches e-mail addresses like name@domain.",
    "Kubernetes pod CIDR 10.244.0.0/16 and service CIDR 10.96.0.0/12.",
    "[1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987]",
    "The invoice total is $1,299.99 including tax.",
    "Phone numbers must match the pattern ^\\+?[0-9]{7,15}$.",
    "let addr = \"::1\"; // IPv6 loopback",
    "a, b = b, a % b  # Euclid's algorithm",
    "Thanks for the help! Have a great day.",
]
for text in negatives:
    cases.append({"text": text, "secrets": [], "source": "hand"})

path = Path(__file__).with_name("redaction_labelled.jsonl")
path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in cases))
print(f"{len(cases)} cases ({sum(1 for c in cases if c['secrets'])} positive) -> {path}")
