<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf-token" content="{{csrf}}">
<title>{{title}} · bnnas dashboard</title>
<link rel="stylesheet" href="/static/dashboard.css">
<script defer src="/static/dashboard.js"></script>
</head>
<body data-poll-ms="{{poll_ms}}">
<header><a href="/" class="brand">bnnas</a>
<nav><a href="/">Studies</a> <a href="/optuna/dashboard">optuna-dashboard</a></nav>
% if logout:
<form method="post" action="/logout" class="logout">
<input type="hidden" name="csrf" value="{{csrf}}"><button>Logout</button></form>
% end
</header>
<main>
{{!base}}
</main>
</body>
</html>
