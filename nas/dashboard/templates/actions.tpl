% running = s['state'] in ('running', 'stopping')
<form class="action" method="post" action="/studies/{{s['id']}}/resume">
<input type="hidden" name="csrf" value="{{csrf}}">
<input type="number" name="trials" min="1" placeholder="{{s['budget'] or ''}}" title="budget of finished trials (blank: keep {{s['budget']}})" aria-label="budget for {{s['name']}}">
<button type="submit" data-action="resume" {{'disabled' if running or not s['resumable'] else ''}}
 title="{{'cannot be resumed: ' + s['resume_refused'] if s['resume_refused'] else 'run the remaining budget'}}"
>Resume</button>
</form>
<form class="action" method="post" action="/studies/{{s['id']}}/stop">
<input type="hidden" name="csrf" value="{{csrf}}">
<button type="submit" data-action="stop" {{'' if s['state'] == 'running' else 'disabled'}}>Stop</button>
</form>
<form class="action" method="post" action="/studies/{{s['id']}}/export">
<input type="hidden" name="csrf" value="{{csrf}}">
% exportable = s['best_trial'] is not None and not s['export_refused']
<button type="submit" data-action="export" {{'' if exportable else 'disabled'}}
 title="{{'cannot export the best: ' + s['export_refused'] if s['export_refused'] else 'retrain, export the best'}}"
>Export best</button>
</form>
