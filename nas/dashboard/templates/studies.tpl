% rebase('base.tpl', title='Studies')
<h1>Studies</h1>
<p class="muted">State comes from trial heartbeats and the budget; this page refreshes itself.</p>
<div id="flash" role="status"></div>
<div data-live="/fragments/studies">
% include('studies_table.tpl')
</div>
% if comparisons:
<section><h2>Comparisons</h2>
<p class="muted">nas-compare runs: each cell is a study of the list above; a comparison's page ranks them.</p>
<ul class="comparisons">
% for c in comparisons:
%   if c.get('error'):
<li class="error" data-field="comparisons-error">{{c['error']}}</li>
%   else:
<li data-comparison="{{c['name']}}"><a href="/comparisons/{{c['id']}}">{{c['name']}}[…]</a>: {{len(c['cells'])}} cells over {{', '.join(c['factors'])}}</li>
%   end
% end
</ul></section>
% end
