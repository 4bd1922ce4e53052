% rebase('base.tpl', title=s['name'])
<h1 class="name">{{s['name']}}</h1>
<p><a href="/optuna/dashboard">optuna-dashboard views of this storage</a> · <a href="/api/studies/{{s['id']}}">JSON</a> · <a href="/studies/{{s['id']}}/log">worker log</a></p>
% if comparison:
<p>A cell of the comparison <a href="/comparisons/{{comparison['id']}}" data-field="comparison">{{comparison['name']}}[…]</a> ({{len(comparison['cells'])}} cells over {{', '.join(comparison['factors'])}})</p>
% end
<div id="flash" role="status"></div>
<div data-live="/fragments/studies/{{s['id']}}">
% include('study_live.tpl', s=s)
</div>
