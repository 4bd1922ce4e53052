% w = s.get('worker')
% if w and w['failed']:
<p class="worker-failed" data-field="worker-failure">The worker started here {{w['started_at']}} {{w['status']}}: <code>{{w['last_line']}}</code> (<a href="/studies/{{s['id']}}/log">log</a>)</p>
% end
