% def num(v, f='{:.4f}'):
%   return '—' if v is None else f.format(v)
% end
% if not studies:
<p>No study in this storage yet: start one with <code>nas-search --config …</code>.</p>
% else:
<table class="studies">
<thead><tr><th>study</th><th>state</th><th>finished / budget</th><th>best CV loss</th><th>best CV accuracy</th><th>best normalization layout</th><th>actions</th></tr></thead>
<tbody>
% for s in studies:
<tr data-study="{{s['name']}}" data-study-id="{{s['id']}}">
<td class="name"><a href="/studies/{{s['id']}}">{{s['name']}}</a></td>
%   if s['state'] == 'unreadable':
<td><span class="state state-unreadable" data-field="state">unreadable</span></td>
<td colspan="5" class="error" data-field="error">{{s['error']}}</td>
%   else:
<td><span class="state state-{{s['state']}}" data-field="state">{{s['state']}}</span>{{' · %d stale' % s['stale_trials'] if s['stale_trials'] else ''}}
% include('worker_note.tpl', s=s)
%     if s['stored_problems']:
<div class="error" data-field="stored-problems">left out, of the wrong type: {{'; '.join(s['stored_problems'])}}</div>
%     end
</td>
<td data-field="finished" data-value="{{s['finished']}}" data-budget="{{s['budget'] if s['budget'] is not None else ''}}">{{s['finished']}} / {{s['budget'] if s['budget'] is not None else '?'}}</td>
<td>{{num(s['best_cv_loss'])}}{{' (trial %d)' % s['best_trial'] if s['best_trial'] is not None else ''}}</td>
<td>{{num(s['best_cv_accuracy'])}}</td>
<td class="layout-short" title="{{s['best_layout'] or ''}}">{{s['best_norms'] or '—'}}</td>
<td class="actions">
% include('actions.tpl', s=s)
</td>
%   end
</tr>
% end
</tbody>
</table>
% end
