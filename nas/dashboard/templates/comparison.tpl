% r = c['result']
% rebase('base.tpl', title='comparison ' + r['base_study'])
<h1 class="name">Comparison {{r['base_study']}}[…]</h1>
<p>nas-compare over {{', '.join(r['columns'].values())}}: {{len(r['cells'])}} cells, each its own study searched by
<code>{{r['sampler']}}</code> for {{r['trials_per_cell']}} trials ({{r['dataset']}}, {{r['folds']}}-fold CV x {{r['epochs']}} epochs), its best
re-evaluated under {{len(r['seeds'])}} fresh seeds · <a href="/api/comparisons/{{c['id']}}">JSON</a></p>
% if c['running']:
<p class="muted">Still searching: {{len(c['running'])}} cell(s); this page shows what the studies hold now (reload to update).</p>
% end
<section><h2>Cells, ranked</h2>
<p class="muted">Test: {{r['test']}}. The table is nas-compare's own (the same functions draw it).</p>
<table class="comparison"><thead><tr>
% for h in c['header']:
<th>{{h}}</th>
% end
<th>study</th></tr></thead><tbody>
% for cell, line in zip(c['ranked'], c['body']):
<tr data-cell="{{cell['label']}}">
%   for v in line:
<td>{{v}}</td>
%   end
<td class="name"><a href="/studies/{{cell['study_id']}}">{{cell['study']}}</a>
%   k = cell['counts']
<br><span class="muted" data-field="counts">{{k['trained']}} trained · {{k['pruned']}} pruned · {{k['failed']}} failed · {{k['repeated']}} repeated</span>
%   if cell['exhausted']:
<br><span class="error" data-field="exhausted">short of its budget: {{cell['exhausted']}}</span>
%   end
</td></tr>
% end
</tbody></table>
</section>
<section><h2>Intervals</h2>
{{!intervals_svg(r['cells'], len(r['seeds']))}}
</section>
