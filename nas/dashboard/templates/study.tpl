% rebase('base.tpl', title=s['name'])
<h1>{{s['name']}}</h1>
<p><a href="/optuna/dashboard">optuna-dashboard views of this storage</a> · <a href="/api/studies/{{q(s['name'])}}">JSON</a> · <a href="/studies/{{q(s['name'])}}/log">worker log</a></p>
<div id="flash" role="status"></div>
<div data-live="/fragments/studies/{{q(s['name'])}}">
% include('study_live.tpl', s=s)
</div>
