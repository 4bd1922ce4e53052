% def num(v, f='{:.4f}'):
%   return '' if v is None else f.format(v)
% end
% if s['state'] == 'unreadable':
<section class="summary" data-study="{{s['name']}}">
<p>State <span class="state state-unreadable" data-field="state">unreadable</span> · <span class="error" data-field="error">{{s['error']}}</span></p>
</section>
% else:
<section class="summary" data-study="{{s['name']}}">
<p>State <span class="state state-{{s['state']}}" data-field="state">{{s['state']}}</span>
· <span data-field="finished" data-value="{{s['finished']}}" data-budget="{{s['budget'] if s['budget'] is not None else ''}}">{{s['finished']}} / {{s['budget'] if s['budget'] is not None else '?'}}</span> finished
· {{s['running_trials']}} running · {{s['failed']}} failed{{' · %d stale (retried on resume)' % s['stale_trials'] if s['stale_trials'] else ''}}{{' · %d duplicate proposal(s), not trained' % s['duplicates'] if s['duplicates'] else ''}}
% if s['best_trial'] is not None:
· best trial {{s['best_trial']}}: CV loss {{num(s['best_cv_loss'])}}, accuracy {{num(s['best_cv_accuracy'])}}, {{s['best_layout']}}
% end
</p>
% include('worker_note.tpl', s=s)
% if s['stored_problems']:
<div class="error" data-field="stored-problems">
<p>Stored attributes left out (of a type bnnas does not write; the rest is shown):</p>
<ul>
%   for line in s['stored_problems']:
<li>{{line}}</li>
%   end
</ul></div>
% end
% if s['resume_refused']:
<p class="muted" data-field="resume-refused">Resume: this study cannot be resumed: {{s['resume_refused']}}</p>
% end
<div class="actions">
% include('actions.tpl', s=s)
</div>
</section>
% if s['live_workers']:
<p class="workers" data-field="workers">Live workers: {{s['live_workers_text']}}</p>
% end
% if s['config_history']:
<section><h2>Config history</h2>
<p class="muted">Forced changes of the study's contract (nas-search --force); each trial records the config version it ran under (0 = the first).</p>
<ol class="history" start="1">
%   for version, h in enumerate(s['config_history'], start=1):
<li>version {{version}} from {{h['at']}} ({{h['by']}}, {{h['source']}}): {{'; '.join('%s: %s -> %s' % (c['key'], show(c['old']), show(c['new'])) for c in h['changes'])}}</li>
%   end
</ol></section>
% end
% end
% if s['worker']:
<section><h2>Worker started here</h2>
<p>{{s['worker']['status']}} (pid {{s['worker']['pid']}}, started {{s['worker']['started_at']}}) — <a href="/studies/{{s['id']}}/log">full log</a></p>
<pre class="log">{{s['worker']['log_tail']}}</pre>
% if s['earlier_workers']:
<p>Earlier workers started from this dashboard's work dir:
%   for w in reversed(s['earlier_workers']):
<a href="/studies/{{s['id']}}/logs/{{w['id']}}" data-log="{{w['id']}}">{{w['started_at']}} ({{w['status']}})</a>
%   end
</p>
% end
</section>
% end
% if s['exports']:
<section><h2>Exports</h2><ul class="exports">
% for e in reversed(s['exports']):
<li data-export="{{e['id']}}">{{e['id']}}: <span data-field="export-status">{{e['status']}}</span>
% if e['files']:
— <a href="/studies/{{s['id']}}/exports/{{e['id']}}/export.zip">all (zip)</a>
%   for f in e['files']:
· <a href="/studies/{{s['id']}}/exports/{{e['id']}}/{{f}}">{{f}}</a>
%   end
% end
· <a href="/studies/{{s['id']}}/exports/{{e['id']}}/log">log</a></li>
% end
</ul></section>
% end
% if s['state'] != 'unreadable':
<section><h2>Optimization history</h2>
{{!history_svg(s['history'])}}
</section>
<section><h2>CV loss by norm type × position</h2>
% g = s['norm_grid']
% if not g['types']:
<p class="muted">No completed trial yet.</p>
% else:
<table class="grid"><thead><tr><th>norm type ↓ · position →</th>
% for p in g['positions']:
<th>{{p}}</th>
% end
</tr></thead><tbody>
% for t in g['types']:
<tr><th>{{t}}</th>
%   for p in g['positions']:
%     c = g['cells'].get(t + '|' + p)
<td>{{'' if c is None else '%.4f (best %.4f, n=%d)' % (c['mean'], c['best'], c['count'])}}</td>
%   end
</tr>
% end
</tbody></table>
<p class="muted">Mean CV loss of the completed trials in each group (best and count in brackets); "mixed" when blocks differ.</p>
% end
</section>
<section><h2>Trials</h2>
<table class="trials"><thead><tr><th>#</th><th>state</th><th>CV loss</th><th>± std</th><th>CV acc</th><th>norm type</th><th>position</th><th>activation</th><th>params</th><th>layout</th><th>note</th></tr></thead><tbody>
% for t in reversed(s['trials']):
<tr class="trial-{{t['state'].lower()}}"><td>{{t['number']}}</td><td>{{t['state']}}</td><td>{{num(t['cv_loss'])}}</td><td>{{num(t['cv_loss_std'])}}</td><td>{{num(t['cv_accuracy'])}}</td>
<td>{{t['norm_type']}}</td><td>{{t['norm_position']}}</td><td>{{t['activation']}}</td><td>{{num(t['params'], '{:,}')}}</td><td class="layout">{{t['layout']}}</td><td>{{t['note']}}</td></tr>
% end
</tbody></table>
</section>
% end
